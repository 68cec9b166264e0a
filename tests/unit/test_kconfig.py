"""Fragment parsing, merging and verification (pure)."""

from __future__ import annotations

import pytest

from zoned.kernel import kconfig
from zoned.kernel.profiles import GUEST_KERNEL_DIR, load_profiles

KCONFIG = """
config RELOCATABLE
\tbool "Build a relocatable kernel"
\tdefault y

config RANDOMIZE_BASE
\tbool "Randomize the address of the kernel image (KASLR)"
\tdepends on RELOCATABLE
\tdefault y

menuconfig MODULES
\tbool "Enable loadable module support"

config USELIB
\tbool "uselib syscall" if EXPERT
\tdepends on !MODULES
"""


def known() -> dict[str, kconfig.KconfigSymbol]:
    symbols: dict[str, kconfig.KconfigSymbol] = {}
    kconfig.parse_kconfig(KCONFIG, symbols)
    return symbols


def test_parse_fragment_values_and_unset_lines() -> None:
    fragment = kconfig.parse_fragment(
        "a.config",
        '# why\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=65536\n\n',
    )
    assert [(o.symbol, o.value, o.line) for o in fragment.options] == [
        ("A", "y", 2),
        ("B", "n", 3),
        ("C", '"x y"', 4),
        ("D", "65536", 5),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CONFIG_A=maybe\n", "a.config:1: bad value for CONFIG_A"),
        ("A=y\n", "a.config:1: not an option line"),
        ("CONFIG_A=y\n# CONFIG_A is not set\n", "a.config:2: CONFIG_A already set on line 1"),
    ],
)
def test_parse_fragment_rejects(text: str, message: str) -> None:
    with pytest.raises(kconfig.FragmentError, match=message):
        kconfig.parse_fragment("a.config", text)


def test_merge_later_fragment_wins_and_reports_override() -> None:
    first = kconfig.parse_fragment("first.config", "# CONFIG_USER_NS is not set\nCONFIG_A=y\n")
    second = kconfig.parse_fragment("second.config", "CONFIG_USER_NS=y\nCONFIG_A=y\n")
    merged, overrides = kconfig.merge([first, second])
    assert merged["USER_NS"].value == "y"
    assert merged["USER_NS"].source == "second.config"
    assert [(o.symbol, o.old.value, o.new.value) for o in overrides] == [("USER_NS", "n", "y")]
    text = kconfig.render_allconfig(merged)
    assert "CONFIG_USER_NS=y\n" in text and "CONFIG_A=y\n" in text


def test_parse_dotconfig() -> None:
    values = kconfig.parse_dotconfig("CONFIG_A=y\n# CONFIG_B is not set\n# comment\n")
    assert values == {"A": "y", "B": "n"}


def test_verify_names_unmet_dependency() -> None:
    requested, _ = kconfig.merge(
        [kconfig.parse_fragment("f", "# CONFIG_RELOCATABLE is not set\nCONFIG_RANDOMIZE_BASE=y\n")]
    )
    obtained = {"RELOCATABLE": "n"}
    [mismatch] = kconfig.verify(requested, obtained, known())
    assert mismatch.describe() == (
        "CONFIG_RANDOMIZE_BASE: asked for y, got n; unmet: depends on RELOCATABLE (RELOCATABLE=n)"
    )


def test_verify_negated_dependency() -> None:
    requested, _ = kconfig.merge(
        [kconfig.parse_fragment("f", "CONFIG_MODULES=y\nCONFIG_USELIB=y\n")]
    )
    [mismatch] = kconfig.verify(requested, {"MODULES": "y"}, known())
    assert mismatch.symbol == "USELIB"
    assert "depends on !MODULES (MODULES=y)" in mismatch.describe()


def test_verify_unknown_symbol_is_an_error_even_when_asked_off() -> None:
    requested, _ = kconfig.merge([kconfig.parse_fragment("f", "# CONFIG_NO_SUCH is not set\n")])
    [mismatch] = kconfig.verify(requested, {}, known())
    assert mismatch.describe() == "CONFIG_NO_SUCH: asked for n, but no Kconfig defines it"


def test_verify_accepts_absent_known_symbol_as_n() -> None:
    requested, _ = kconfig.merge([kconfig.parse_fragment("f", "# CONFIG_MODULES is not set\n")])
    assert kconfig.verify(requested, {}, known()) == []


def test_fragments_hash_changes_with_any_byte() -> None:
    a = kconfig.fragments_hash([("a", "CONFIG_A=y\n")])
    assert a == kconfig.fragments_hash([("a", "CONFIG_A=y\n")])
    assert a != kconfig.fragments_hash([("a", "CONFIG_A=n\n")])
    assert a != kconfig.fragments_hash([("b", "CONFIG_A=y\n")])


def test_shipped_profiles_parse_and_merge() -> None:
    profiles = load_profiles()
    assert {"strict", "containers"} <= set(profiles.profiles)
    for name, profile in profiles.profiles.items():
        fragments = [
            kconfig.parse_fragment(f, (GUEST_KERNEL_DIR / "fragments" / f"{f}.config").read_text())
            for f in profile.fragments
        ]
        merged, _ = kconfig.merge(fragments)
        assert merged["MODULES"].value == "n", name
        want_userns = "y" if name == "containers" else "n"
        assert merged["USER_NS"].value == want_userns, name
        assert merged["BPF_SYSCALL"].value == want_userns, name


def test_every_option_group_has_a_comment() -> None:
    """Each run of option lines in a shipped fragment is preceded by a '# why' comment."""
    for path in sorted((GUEST_KERNEL_DIR / "fragments").glob("*.config")):
        previous = ""
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            is_option = line.startswith("CONFIG_") or line.endswith(" is not set")
            if is_option and previous == "":
                pytest.fail(f"{path.name}:{number}: option group without a comment")
            previous = line
