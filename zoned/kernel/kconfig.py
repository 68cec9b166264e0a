"""Kernel config fragments: parsing, merging and verification (pure).

A *fragment* is a file in ``.config`` syntax. Each option line asks for one
value; ``# CONFIG_FOO is not set`` asks for ``n``. Other ``#`` lines are
comments that say why the options below them are there, except a
recommendation deliberately left out, written as::

    # not taken: CONFIG_FOO=y: why not (continued on lines
    #    that start with "#" and two or more spaces)

(or ``# not taken: CONFIG_FOO is not set: why``). These are recorded in the
build manifest, and a profile may not both take and refuse the same value.

Rules:

- A fragment may name a symbol once. Later fragments in a profile override
  earlier ones; each override is reported, so that it is deliberate.
- After ``make olddefconfig`` every requested option must have exactly the
  requested value. An option that is absent from the resulting ``.config``
  counts as ``n`` only when its symbol exists in the source tree: asking for
  a symbol that no Kconfig file defines is a mistake, not an ``n``.
- A mismatch is reported with the symbol, the value asked for, the value
  obtained and, where the Kconfig files tell, the dependencies that are not
  met.

This module reads no files; the build tool passes text in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_VALUE_RE = re.compile(r'^(y|m|n|-?[0-9]+|0x[0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')
_NOT_TAKEN_RE = re.compile(r"^# not taken: (CONFIG_[A-Za-z0-9_]+)(?:=(\S+)| is not set): (\S.*)$")
_CONTINUATION_RE = re.compile(r"^#\s{2,}(\S.*)$")


class FragmentError(ValueError):
    """A fragment line that is not a valid option, or a symbol named twice."""


@dataclass(frozen=True)
class Option:
    """One requested option: ``symbol`` without the ``CONFIG_`` prefix."""

    symbol: str
    value: str
    source: str
    line: int


@dataclass(frozen=True)
class NotTaken:
    """A recommended value deliberately not requested, with the reason."""

    symbol: str
    recommended: str
    reason: str
    source: str
    line: int

    def describe(self) -> str:
        return f"{self.symbol}={self.recommended}: {self.reason}"


@dataclass(frozen=True)
class Fragment:
    name: str
    text: str
    options: tuple[Option, ...]
    not_taken: tuple[NotTaken, ...] = ()


@dataclass(frozen=True)
class Override:
    symbol: str
    old: Option
    new: Option


@dataclass(frozen=True)
class Mismatch:
    """A requested option that did not end with the requested value."""

    symbol: str
    wanted: str
    obtained: str | None  # None: the symbol does not exist in this kernel
    unmet: tuple[str, ...]  # dependencies (as written in Kconfig) found unmet

    def describe(self) -> str:
        if self.obtained is None:
            return f"CONFIG_{self.symbol}: asked for {self.wanted}, but no Kconfig defines it"
        text = f"CONFIG_{self.symbol}: asked for {self.wanted}, got {self.obtained}"
        if self.unmet:
            text += "; unmet: " + ", ".join(self.unmet)
        return text


def parse_fragment(name: str, text: str) -> Fragment:
    """Parse one fragment; raise FragmentError naming the file and line."""
    options: list[Option] = []
    not_taken: list[NotTaken] = []
    seen: dict[str, int] = {}
    continuing = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continuing = False
            continue
        refused = _NOT_TAKEN_RE.match(line)
        continued = _CONTINUATION_RE.match(raw) if continuing else None
        continuing = False
        if refused:
            symbol = refused.group(1).removeprefix("CONFIG_")
            value = refused.group(2) or "n"
            if not _VALUE_RE.match(value):
                raise FragmentError(f"{name}:{number}: bad value for {refused.group(1)}: {value!r}")
            not_taken.append(NotTaken(symbol, value, refused.group(3), name, number))
            continuing = True
            continue
        if continued:
            last = not_taken[-1]
            reason = f"{last.reason} {continued.group(1)}"
            not_taken[-1] = NotTaken(last.symbol, last.recommended, reason, last.source, last.line)
            continuing = True
            continue
        unset = _UNSET_RE.match(line)
        if unset:
            symbol, value = unset.group(1), "n"
        elif line.startswith("#"):
            continue
        else:
            match = _SET_RE.match(line)
            if match is None:
                raise FragmentError(f"{name}:{number}: not an option line: {raw!r}")
            symbol, value = match.group(1), match.group(2)
            if not _VALUE_RE.match(value):
                raise FragmentError(f"{name}:{number}: bad value for {symbol}: {value!r}")
        bare = symbol.removeprefix("CONFIG_")
        if bare in seen:
            raise FragmentError(
                f"{name}:{number}: {symbol} already set on line {seen[bare]} of this fragment"
            )
        seen[bare] = number
        options.append(Option(bare, value, name, number))
    return Fragment(name, text, tuple(options), tuple(not_taken))


def merge(fragments: Sequence[Fragment]) -> tuple[dict[str, Option], list[Override]]:
    """Merge fragments in order; later fragments win and every override is listed."""
    merged: dict[str, Option] = {}
    overrides: list[Override] = []
    for fragment in fragments:
        for option in fragment.options:
            previous = merged.get(option.symbol)
            if previous is not None and previous.value != option.value:
                overrides.append(Override(option.symbol, previous, option))
            merged[option.symbol] = option
    return merged, overrides


def not_taken(fragments: Sequence[Fragment], merged: Mapping[str, Option]) -> list[NotTaken]:
    """The profile's recommendations left out, each with its reason.

    A FragmentError when the profile requests exactly the value that one of
    its fragments says it does not take: one of the two is out of date.
    """
    refused: list[NotTaken] = []
    for fragment in fragments:
        for entry in fragment.not_taken:
            option = merged.get(entry.symbol)
            if option is not None and option.value == entry.recommended:
                raise FragmentError(
                    f"{entry.source}:{entry.line}: CONFIG_{entry.symbol}={entry.recommended} "
                    f"is listed as not taken, but {option.source}:{option.line} requests it"
                )
            refused.append(entry)
    return refused


def render_allconfig(merged: Mapping[str, Option]) -> str:
    """The merged request in ``.config`` syntax, for ``KCONFIG_ALLCONFIG``."""
    lines = []
    for option in merged.values():
        if option.value == "n":
            lines.append(f"# CONFIG_{option.symbol} is not set")
        else:
            lines.append(f"CONFIG_{option.symbol}={option.value}")
    return "\n".join(lines) + "\n"


def fragments_hash(parts: Iterable[tuple[str, str]]) -> str:
    """sha256 over (name, text) pairs plus anything else that shapes the build."""
    digest = hashlib.sha256()
    for name, text in parts:
        for item in (name, text):
            data = item.encode()
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def parse_dotconfig(text: str) -> dict[str, str]:
    """Values in a generated ``.config``; ``is not set`` lines become ``n``."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        unset = _UNSET_RE.match(line)
        if unset:
            values[unset.group(1).removeprefix("CONFIG_")] = "n"
            continue
        match = _SET_RE.match(line)
        if match:
            values[match.group(1).removeprefix("CONFIG_")] = match.group(2)
    return values


@dataclass(frozen=True)
class KconfigSymbol:
    name: str
    depends: tuple[str, ...]  # each "depends on" expression, as written


_CONFIG_DEF_RE = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")
_DEPENDS_RE = re.compile(r"^\s*depends\s+on\s+(.+?)\s*$")
_BLOCK_END_RE = re.compile(
    r"^\s*(?:(?:menu)?config|choice|endchoice|menu|endmenu|if|endif|comment|source)\b"
)


def parse_kconfig(text: str, into: dict[str, KconfigSymbol]) -> None:
    """Collect symbol definitions and their ``depends on`` lines from one Kconfig file.

    A symbol defined in several places keeps the union of its dependencies.
    ``if`` blocks around definitions are not tracked: the unmet-dependency
    report is a diagnostic aid, the verdict comes from the ``.config``.
    """
    current: str | None = None
    depends: list[str] = []

    def flush() -> None:
        if current is None:
            return
        old = into.get(current)
        merged = tuple(dict.fromkeys((*(old.depends if old else ()), *depends)))
        into[current] = KconfigSymbol(current, merged)

    for raw in text.splitlines():
        definition = _CONFIG_DEF_RE.match(raw)
        if definition:
            flush()
            current, depends = definition.group(1), []
            continue
        if current is None:
            continue
        dep = _DEPENDS_RE.match(raw)
        if dep:
            depends.append(dep.group(1))
        elif _BLOCK_END_RE.match(raw):
            flush()
            current, depends = None, []
    flush()


_IDENT_RE = re.compile(r"\b([A-Z][A-Z0-9_]*)\b")


def unmet_dependencies(
    symbol: KconfigSymbol, obtained: Mapping[str, str], known: Mapping[str, KconfigSymbol]
) -> tuple[str, ...]:
    """The dependency expressions that name a symbol which ended up ``n``."""
    unmet = []
    for expression in symbol.depends:
        names = [n for n in _IDENT_RE.findall(expression) if n in known]
        off = [n for n in names if obtained.get(n, "n") == "n"]
        negated = [n for n in names if f"!{n}" in expression.replace(" ", "")]
        if any(n not in negated for n in off) or any(obtained.get(n, "n") != "n" for n in negated):
            states = ", ".join(f"{n}={obtained.get(n, 'n')}" for n in names)
            unmet.append(f"depends on {expression} ({states})")
    return tuple(unmet)


def verify(
    requested: Mapping[str, Option],
    obtained: Mapping[str, str],
    known: Mapping[str, KconfigSymbol],
) -> list[Mismatch]:
    """Every requested option that did not end as asked, in request order."""
    mismatches = []
    for option in requested.values():
        if option.symbol not in known:
            mismatches.append(Mismatch(option.symbol, option.value, None, ()))
            continue
        got = obtained.get(option.symbol, "n")
        if got != option.value:
            unmet = unmet_dependencies(known[option.symbol], obtained, known)
            mismatches.append(Mismatch(option.symbol, option.value, got, unmet))
    return mismatches
