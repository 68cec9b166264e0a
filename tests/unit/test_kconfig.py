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


def test_not_taken_entries_are_parsed_with_their_reason() -> None:
    fragment = kconfig.parse_fragment(
        "f.config",
        "# why\nCONFIG_A=y\n# not taken: CONFIG_B=y: no B here;\n#    really none\n"
        "# not taken: CONFIG_C is not set: C is needed\n#   by D\n# CONFIG_E is not set\n",
    )
    assert [o.symbol for o in fragment.options] == ["A", "E"]
    assert [(n.symbol, n.recommended, n.reason, n.line) for n in fragment.not_taken] == [
        ("B", "y", "no B here; really none", 3),
        ("C", "n", "C is needed by D", 5),
    ]
    merged, _ = kconfig.merge([fragment])
    assert [n.describe() for n in kconfig.not_taken([fragment], merged)] == [
        "B=y: no B here; really none",
        "C=n: C is needed by D",
    ]


def test_not_taken_yet_requested_is_a_contradiction() -> None:
    first = kconfig.parse_fragment("a.config", "# not taken: CONFIG_X=y: no X\n")
    second = kconfig.parse_fragment("b.config", "CONFIG_X=y\n")
    merged, _ = kconfig.merge([first, second])
    with pytest.raises(
        kconfig.FragmentError,
        match=r"a.config:1: CONFIG_X=y is listed as not taken, but b.config:1 requests it",
    ):
        kconfig.not_taken([first, second], merged)
    # Requesting another value than the one recommended is what "not taken" means.
    other = kconfig.parse_fragment("c.config", "# CONFIG_X is not set\n")
    merged, _ = kconfig.merge([first, other])
    assert [n.symbol for n in kconfig.not_taken([first, other], merged)] == ["X"]


#: The Kernel Self Protection Project's recommended settings for x86-64 as they
#: apply to 6.12 (kernsec.org "Recommended Settings", the kernel's own
#: kernel/configs/hardening.config and arch/x86/configs/hardening.config,
#: kernel-hardening-checker's KSPP list), with the attack-surface reductions
#: grsecurity and CLIP OS recommend. Each must be requested with this value by
#: every profile, or be listed in a fragment as "not taken" with the reason.
#: Symbols these lists name that 6.12 no longer has at all (DEVKMEM,
#: ACPI_CUSTOM_METHOD, BINFMT_AOUT, X86_X32, X86_PTDUMP, ...) are left out.
KSPP_X86_64 = {
    # kernel/configs/hardening.config
    "BUG": "y",
    "STRICT_KERNEL_RWX": "y",
    "STRICT_MODULE_RWX": "y",
    "VMAP_STACK": "y",
    "RANDOMIZE_BASE": "y",
    "RANDOMIZE_MEMORY": "y",
    "SLAB_FREELIST_RANDOM": "y",
    "SLAB_FREELIST_HARDENED": "y",
    "SLAB_BUCKETS": "y",
    "SHUFFLE_PAGE_ALLOCATOR": "y",
    "RANDOM_KMALLOC_CACHES": "y",
    "PAGE_TABLE_CHECK": "y",
    "PAGE_TABLE_CHECK_ENFORCED": "y",
    "RANDOMIZE_KSTACK_OFFSET_DEFAULT": "y",
    "STACKPROTECTOR": "y",
    "STACKPROTECTOR_STRONG": "y",
    "HARDENED_USERCOPY": "y",
    "FORTIFY_SOURCE": "y",
    "UBSAN": "y",
    "UBSAN_TRAP": "y",
    "UBSAN_BOUNDS": "y",
    "UBSAN_SHIFT": "n",
    "UBSAN_DIV_ZERO": "n",
    "UBSAN_UNREACHABLE": "n",
    "UBSAN_SIGNED_WRAP": "n",
    "UBSAN_BOOL": "n",
    "UBSAN_ENUM": "n",
    "UBSAN_ALIGNMENT": "n",
    "KFENCE": "y",
    "LIST_HARDENED": "y",
    "INIT_ON_ALLOC_DEFAULT_ON": "y",
    "INIT_STACK_ALL_ZERO": "y",
    "RESET_ATTACK_MITIGATION": "y",
    "EFI_DISABLE_PCI_DMA": "y",
    "IOMMU_SUPPORT": "y",
    "IOMMU_DEFAULT_DMA_STRICT": "y",
    "STRICT_DEVMEM": "y",
    "IO_STRICT_DEVMEM": "y",
    "SECCOMP": "y",
    "SECCOMP_FILTER": "y",
    "SYN_COOKIES": "y",
    "CFI_CLANG": "y",
    "CFI_PERMISSIVE": "n",
    "LDISC_AUTOLOAD": "n",
    "COMPAT_BRK": "n",
    "PROC_KCORE": "n",
    "COMPAT_VDSO": "n",
    "LEGACY_PTYS": "n",
    # arch/x86/configs/hardening.config
    "LEGACY_VSYSCALL_NONE": "y",
    "INTEL_IOMMU": "y",
    "INTEL_IOMMU_DEFAULT_ON": "y",
    "INTEL_IOMMU_SVM": "y",
    "AMD_IOMMU": "y",
    "X86_KERNEL_IBT": "y",
    "X86_USER_SHADOW_STACK": "y",
    # kernsec.org and kernel-hardening-checker (self protection)
    "DEBUG_WX": "y",
    "WERROR": "y",
    "X86_MCE": "y",
    "X86_MCE_INTEL": "y",
    "X86_MCE_AMD": "y",
    "MICROCODE": "y",
    "X86_UMIP": "y",
    "CPU_MITIGATIONS": "y",
    "MITIGATION_PAGE_TABLE_ISOLATION": "y",
    "MITIGATION_RETPOLINE": "y",
    "MITIGATION_RFDS": "y",
    "MITIGATION_SPECTRE_BHI": "y",
    "MITIGATION_SRSO": "y",
    "MITIGATION_SLS": "y",
    "X86_INTEL_TSX_MODE_OFF": "y",
    "DEBUG_LIST": "y",
    "DEBUG_VIRTUAL": "y",
    "DEBUG_SG": "y",
    "DEBUG_NOTIFIERS": "y",
    "DEBUG_CREDENTIALS": "y",
    "BUG_ON_DATA_CORRUPTION": "y",
    "SCHED_STACK_END_CHECK": "y",
    "SLAB_MERGE_DEFAULT": "n",
    "INIT_ON_FREE_DEFAULT_ON": "y",
    "ZERO_CALL_USED_REGS": "y",
    "HARDENED_USERCOPY_DEFAULT_ON": "y",
    "HARDENED_USERCOPY_FALLBACK": "n",
    "HARDENED_USERCOPY_PAGESPAN": "n",
    "KFENCE_SAMPLE_INTERVAL": "100",
    "RANDSTRUCT_FULL": "y",
    "GCC_PLUGIN_LATENT_ENTROPY": "y",
    "GCC_PLUGIN_STACKLEAK": "y",
    "STACKLEAK_METRICS": "n",
    "STACKLEAK_RUNTIME_DISABLE": "n",
    "UBSAN_LOCAL_BOUNDS": "y",
    "UBSAN_SANITIZE_ALL": "y",
    "STATIC_USERMODEHELPER": "y",
    "SCHED_CORE": "y",
    "SECURITY_LOCKDOWN_LSM": "y",
    "SECURITY_LOCKDOWN_LSM_EARLY": "y",
    "LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY": "y",
    "MODULE_SIG": "y",
    "MODULE_SIG_ALL": "y",
    "MODULE_SIG_SHA512": "y",
    "MODULE_SIG_FORCE": "y",
    "HW_RANDOM_TPM": "y",
    "DEFAULT_MMAP_MIN_ADDR": "65536",
    "IOMMU_DEFAULT_PASSTHROUGH": "n",
    "AMD_IOMMU_V2": "y",
    "ARCH_MMAP_RND_BITS": "32",
    "ARCH_MMAP_RND_COMPAT_BITS": "16",
    "PANIC_ON_OOPS": "y",
    "PANIC_TIMEOUT": "-1",
    "PROC_MEM_NO_FORCE": "y",
    # security policy
    "SECURITY_YAMA": "y",
    "SECURITY_LANDLOCK": "y",
    "SECURITY_SELINUX": "y",
    "SECURITY_DMESG_RESTRICT": "y",
    "SECURITY_PERF_EVENTS_RESTRICT": "y",
    # attack surface: KSPP
    "MODULES": "n",
    "DEVMEM": "n",
    "BINFMT_MISC": "n",
    "INET_DIAG": "n",
    "KEXEC": "n",
    "HIBERNATION": "n",
    "COMPAT": "n",
    "IA32_EMULATION": "n",
    "X86_X32_ABI": "n",
    "MODIFY_LDT_SYSCALL": "n",
    "X86_MSR": "n",
    "LEGACY_TIOCSTI": "n",
    "X86_VSYSCALL_EMULATION": "n",
    # attack surface: grsecurity
    "PROC_VMCORE": "n",
    "PROC_PAGE_MONITOR": "n",
    "USELIB": "n",
    "CHECKPOINT_RESTORE": "n",
    "USERFAULTFD": "n",
    "DEVPORT": "n",
    "DEBUG_FS": "n",
    "FTRACE": "n",
    "KPROBES": "n",
    "IO_URING": "n",
    "KCMP": "n",
    "RSEQ": "n",
    "LATENCYTOP": "n",
    "KCOV": "n",
    "X86_16BIT": "n",
    "CACHESTAT_SYSCALL": "n",
    "PROVE_LOCKING": "n",
    "MPTCP": "n",
    "TLS": "n",
    "TIPC": "n",
    "PAGE_OWNER": "n",
    "DEBUG_KMEMLEAK": "n",
    "NOTIFIER_ERROR_INJECTION": "n",
    "ACPI_CONFIGFS": "n",
    "FAULT_INJECTION": "n",
    "BLK_DEV_WRITE_MOUNTED": "n",
    "LIVEPATCH": "n",
    "IP_SCTP": "n",
    "IP_DCCP": "n",
    "KGDB": "n",
    "N_GSM": "n",
    "VT": "n",
    "FB": "n",
    # attack surface: CLIP OS
    "STAGING": "n",
    "KSM": "n",
    "KALLSYMS": "n",
    "KEXEC_FILE": "n",
    "CRASH_DUMP": "n",
    "USER_NS": "n",
    "X86_CPUID": "n",
    "X86_IOPL_IOPERM": "n",
    "ACPI_TABLE_UPGRADE": "n",
    "AIO": "n",
    "MAGIC_SYSRQ": "n",
    "COREDUMP": "n",
    "BPF_SYSCALL": "n",
}


def shipped_fragments(profile: str) -> list[kconfig.Fragment]:
    return [
        kconfig.parse_fragment(f, (GUEST_KERNEL_DIR / "fragments" / f"{f}.config").read_text())
        for f in load_profiles().profiles[profile].fragments
    ]


@pytest.mark.parametrize("profile", ["strict", "containers"])
def test_every_kspp_recommendation_is_taken_or_refused_with_a_reason(profile: str) -> None:
    fragments = shipped_fragments(profile)
    merged, _ = kconfig.merge(fragments)
    refused = {entry.symbol: entry for entry in kconfig.not_taken(fragments, merged)}
    missing = [
        f"CONFIG_{symbol}={value}"
        for symbol, value in KSPP_X86_64.items()
        if (symbol not in merged or merged[symbol].value != value) and symbol not in refused
    ]
    assert missing == [], f"{profile}: neither requested nor listed as not taken: {missing}"
    for symbol, entry in refused.items():
        assert len(entry.reason) > 10, (symbol, entry.reason)
    if profile == "strict":
        assert "USER_NS" not in refused and "BPF_SYSCALL" not in refused
