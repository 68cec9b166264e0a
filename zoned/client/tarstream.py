"""A tar stream that came out of a zone, read without trusting a byte of it.

Sans-IO and pure: :class:`TarReader` is fed the stream as it arrives and
hands back what it holds, :class:`Member` headers each followed by its
contents (``bytes`` pieces, regular files only). It never interprets a name
against a filesystem: :mod:`zoned.client.extract` does that, by directory
file descriptors. The standard library's ``tarfile`` is not used: its
filters have been bypassed (CVE-2025-4517), and it reads a long-name
record whole into memory, however long the zone says it is.

Rules
-----
- 512-byte blocks. A header's checksum must match; numeric fields are
  octal (or GNU base-256, positive); the magic is POSIX ustar (whose
  ``prefix`` joins the name) or GNU's (what busybox writes). Anything else
  is refused.
- Kinds: regular files (``0``, NUL, ``7``), directories (``5``), symbolic
  links (``2``), hard links (``1``). GNU long names and long link targets
  (``L``, ``K``, at most :data:`MAX_NAME_BYTES`) and pax records (``x``:
  ``path``, ``linkpath``, ``size``, ``mtime``; ``g`` is skipped; each at
  most :data:`MAX_PAX_BYTES`) apply to the next header. Devices, FIFOs,
  sparse files and every other kind are refused.
- Names are split into components: a leading ``./`` and empty or ``.``
  components are dropped (``.`` itself is the tree's root, ``()``);
  absolute names, ``..``, NUL bytes, a component over 255 bytes, a name
  over :data:`MAX_NAME_BYTES` or deeper than :data:`MAX_DEPTH` are refused.
  A hard link's target is a name like any other; a symbolic link's target
  is kept as bytes (not empty, no NUL, at most :data:`MAX_NAME_BYTES`).
- At most ``max_entries`` members. The archive must end with its
  end-of-archive block, after which only zero bytes may follow; a stream
  that stops anywhere else is truncated (refused by :meth:`TarReader.finish`).

Every refusal is :class:`UnsafeTree` (an ``InvalidRequest``) naming the
member it is about.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from zoned.errors import InvalidRequest

BLOCK = 512
#: Longest name or link target (Linux's PATH_MAX).
MAX_NAME_BYTES = 4096
#: Longest name component (NAME_MAX).
MAX_COMPONENT_BYTES = 255
#: Most components in a name.
MAX_DEPTH = 256
#: Largest pax extended-header record set.
MAX_PAX_BYTES = 64 * 1024
#: Members a tree may have by default.
DEFAULT_MAX_ENTRIES = 100_000
#: Modification times beyond this (year 2514) are taken as this.
MAX_MTIME = 2**34

MemberKind = Literal["file", "directory", "symlink", "hardlink"]
_KINDS: dict[bytes, MemberKind] = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"5": "directory",
    b"2": "symlink",
    b"1": "hardlink",
}
_SPECIAL = {b"3": "a character device", b"4": "a block device", b"6": "a FIFO"}
_GNU_MAGIC = b"ustar  \0"
_USTAR_MAGIC = b"ustar\x00"


class UnsafeTree(InvalidRequest):
    """A tree from a zone that will not be copied: what is wrong, naming the member."""


class Member(NamedTuple):
    """One member's header; a ``file``'s ``size`` bytes of contents follow it."""

    #: Name components below the tree's root (``()``: the root itself).
    path: tuple[bytes, ...]
    kind: MemberKind
    size: int
    #: Permission bits as the zone gave them (the extractor decides what it keeps).
    mode: int
    mtime: int
    #: A symlink's target (raw bytes).
    target: bytes = b""
    #: A hard link's target.
    link: tuple[bytes, ...] = ()


def show(name: bytes | tuple[bytes, ...]) -> str:
    """A member name for an error message: printable, bounded."""
    raw = b"/".join(name) if isinstance(name, tuple) else name
    text = raw[:200].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return repr(text + ("..." if len(raw) > 200 else "") or ".")


def split_name(raw: bytes) -> tuple[bytes, ...]:
    """A member's name as components; :class:`UnsafeTree` if it is unsafe."""
    parts, problem = _components(raw)
    if problem:
        raise UnsafeTree(f"member {show(raw)}: the name {problem}")
    return parts


def _components(raw: bytes) -> tuple[tuple[bytes, ...], str]:
    """``raw`` split into components, and what makes it unsafe ("": nothing)."""
    if len(raw) > MAX_NAME_BYTES:
        return (), f"is longer than {MAX_NAME_BYTES} bytes"
    if b"\0" in raw:
        return (), "holds a NUL byte"
    if raw.startswith(b"/"):
        return (), "is absolute"
    parts = tuple(part for part in raw.split(b"/") if part not in (b"", b"."))
    if b".." in parts:
        return (), "goes up ('..')"
    if len(parts) > MAX_DEPTH:
        return (), f"is deeper than {MAX_DEPTH}"
    if any(len(part) > MAX_COMPONENT_BYTES for part in parts):
        return (), f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    return parts, ""


def _number(field: bytes, what: str, name: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256, positive
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits:
        return 0
    if not all(48 <= c <= 55 for c in digits):
        raise UnsafeTree(f"member {show(name)}: its {what} field is not a number")
    return int(digits, 8)


def _decimal(text: bytes, what: str, name: bytes) -> int:
    if not text.isdigit() or len(text) > 20:
        raise UnsafeTree(f"member {show(name)}: its {what} is not a number")
    return int(text)


def _nul_terminated(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


class TarReader:
    """The tar stream of one tree, fed as it comes (see the module rules)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.entries = 0
        self._buffer = bytearray()
        #: "header", "data", "padding", "meta" (a long name or pax record), "end".
        self._state = "header"
        self._remaining = 0
        self._padding = 0
        #: What the next header takes from GNU long names and pax records.
        self._next: dict[str, bytes] = {}
        self._meta_kind = b""
        self._meta = bytearray()
        self._current = b""

    def feed(self, data: bytes) -> list[Member | bytes]:
        """Take more of the stream; what it completes, in order."""
        self._buffer += data
        out: list[Member | bytes] = []
        while True:
            if self._state == "end":
                if self._buffer.strip(b"\0"):
                    raise UnsafeTree("the archive goes on after its end")
                self._buffer.clear()
                return out
            if self._state == "data":
                if not self._buffer:
                    return out
                piece = bytes(self._buffer[: self._remaining])
                del self._buffer[: len(piece)]
                self._remaining -= len(piece)
                out.append(piece)
                if self._remaining == 0:
                    self._state = "padding"
                continue
            if self._state == "meta":
                take = min(len(self._buffer), self._remaining)
                self._meta += self._buffer[:take]
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return out
                self._apply_meta()
                self._state = "padding"
                continue
            if self._state == "padding":
                take = min(len(self._buffer), self._padding)
                del self._buffer[:take]
                self._padding -= take
                if self._padding:
                    return out
                self._state = "header"
                continue
            if len(self._buffer) < BLOCK:
                return out
            header = bytes(self._buffer[:BLOCK])
            del self._buffer[:BLOCK]
            member = self._header(header)
            if member is not None:
                out.append(member)

    def finish(self) -> None:
        """The stream ended: :class:`UnsafeTree` unless the archive did."""
        if self._state != "end":
            raise UnsafeTree(
                f"the archive is truncated (in {show(self._current)})"
                if self._current
                else "the archive is truncated"
            )

    def _header(self, header: bytes) -> Member | None:
        if not header.strip(b"\0"):
            if self._next:
                raise UnsafeTree("the archive ends after a long name or pax record")
            self._state = "end"
            return None
        raw_name = _nul_terminated(header[0:100])
        self._current = raw_name
        stored = _number(header[148:156], "checksum", raw_name)
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise UnsafeTree(f"member {show(raw_name)}: bad header checksum")
        magic = header[257:265]
        if magic == _GNU_MAGIC:
            pass
        elif magic[:6] == _USTAR_MAGIC:
            prefix = _nul_terminated(header[345:500])
            if prefix:
                raw_name = prefix + b"/" + raw_name
        else:
            raise UnsafeTree(f"member {show(raw_name)}: not a ustar or GNU tar header")
        kind_flag = header[156:157]
        size = _number(header[124:136], "size", raw_name)
        padding = -size % BLOCK
        if kind_flag in (b"L", b"K", b"x", b"g"):
            limit = MAX_PAX_BYTES if kind_flag in (b"x", b"g") else MAX_NAME_BYTES + 1
            if size > limit:
                raise UnsafeTree(
                    f"member {show(raw_name)}: a long name or pax record of {size} bytes"
                )
            self._meta_kind = kind_flag
            self._meta = bytearray()
            self._remaining, self._padding = size, padding
            self._state = "meta" if size else "padding"
            if not size:
                self._apply_meta()
            return None
        if kind_flag in _SPECIAL:
            raise UnsafeTree(f"member {show(raw_name)} is {_SPECIAL[kind_flag]}")
        kind = _KINDS.get(kind_flag)
        if kind is None:
            raise UnsafeTree(f"member {show(raw_name)}: unsupported kind {kind_flag!r}")
        pending, self._next = self._next, {}
        raw_name = pending.get("path", raw_name)
        raw_link = pending.get("linkpath", _nul_terminated(header[157:257]))
        if "size" in pending:
            size = _decimal(pending["size"], "pax size", raw_name)
            padding = -size % BLOCK
        mtime = _number(header[136:148], "mtime", raw_name)
        if "mtime" in pending:
            mtime = _decimal(pending["mtime"].split(b".")[0], "pax mtime", raw_name)
        mtime = min(mtime, MAX_MTIME)
        self._current = raw_name
        self.entries += 1
        if self.entries > self.max_entries:
            raise UnsafeTree(f"the tree has more than {self.max_entries} entries")
        path = split_name(raw_name)
        member = Member(
            path=path,
            kind=kind,
            size=size if kind == "file" else 0,
            mode=_number(header[100:108], "mode", raw_name) & 0o7777,
            mtime=mtime,
        )
        if kind == "symlink":
            if not raw_link or len(raw_link) > MAX_NAME_BYTES or b"\0" in raw_link:
                raise UnsafeTree(f"member {show(raw_name)}: a bad symbolic link target")
            member = member._replace(target=raw_link)
        elif kind == "hardlink":
            link, problem = _components(raw_link)
            if problem:
                raise UnsafeTree(
                    f"member {show(raw_name)}: a hard link to {show(raw_link)}, which {problem}"
                )
            member = member._replace(link=link)
        if kind == "file":
            self._remaining, self._padding = size, padding
            self._state = "data" if size else "padding"
        elif size:
            # Data on a member that has none: skip it (the size counted against the stream).
            self._remaining, self._padding = 0, size + padding
            self._state = "padding"
        if member.path == () and kind != "directory":
            raise UnsafeTree(f"member {show(raw_name)}: the tree's root is not a directory")
        return member

    def _apply_meta(self) -> None:
        data = bytes(self._meta)
        if self._meta_kind == b"L":
            self._next["path"] = _nul_terminated(data)
        elif self._meta_kind == b"K":
            self._next["linkpath"] = _nul_terminated(data)
        elif self._meta_kind == b"x":
            self._next.update(_pax_records(data, self._current))


def _pax_records(data: bytes, name: bytes) -> dict[str, bytes]:
    """``"<length> <key>=<value>\\n"`` records; only the keys this reader honours."""
    found: dict[str, bytes] = {}
    while data:
        length_text, space, _ = data.partition(b" ")
        if not space or not length_text.isdigit() or not 0 < int(length_text) <= len(data):
            raise UnsafeTree(f"member {show(name)}: a bad pax record")
        record, data = data[: int(length_text)], data[int(length_text) :]
        key, eq, value = record[len(length_text) + 1 :].partition(b"=")
        if not eq or not value.endswith(b"\n"):
            raise UnsafeTree(f"member {show(name)}: a bad pax record")
        if key in (b"path", b"linkpath", b"size", b"mtime"):
            found[key.decode()] = value[:-1]
    return found
