"""The daemon's typed configuration, read from a TOML file.

Every path the daemon touches is here so that tests (and unusual hosts) can
move the whole daemon into a temporary directory. Unknown keys are rejected:
a typo in the config file is an error at start-up, not a silently ignored
setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from zoned.errors import ConfigError, InvalidRequest
from zoned.httpserve import parse_listen_address
from zoned.kernel.store import DEFAULT_STORE
from zoned.net.addressing import LINK_PREFIX_PATTERN
from zoned.net.policy import parse_policy
from zoned.net.wire import Limits as NetLimits
from zoned.protocol import MAX_POOLS, PoolName, PoolSpec

DEFAULT_CONFIG_PATH = Path("/etc/zoned/zoned.toml")
#: The highest uid a zone's QEMU may get: 2^31 - 2 (2^31 - 1 is kept as a
#: margin from the signed overflow that some tools make of larger ones).
MAX_ZONE_UID = 2**31 - 2


class E2bKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One API key of the E2B endpoint: who presents it acts as ``owner``."""

    # What the audit trail and the daemon's log call the key.
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")]
    # The key's sha256 in hex (`printf %s "$KEY" | sha256sum`): the key itself
    # is never written on the host.
    key_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    # The host user (a name or a uid) the key's callers act as: the zones
    # they create are that user's, and they see that user's zones only
    # (all zones if the user is root or an administrator).
    owner: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class E2bTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What an E2B template name makes: a zone of this size and kernel profile."""

    vcpus: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    memory_mib: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 512
    profile: str = "strict"
    # The zone's image (docs/images.md): "" the daemon's default_image,
    # "builtin" the small built-in root, else a tag, name@digest or id of the
    # image store. Checked when a sandbox is created (an image removed later
    # makes that template's creates fail, saying so).
    image: Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[!-~]*\Z")] = ""
    # The most network a sandbox of this template may have (docs/e2b.md): a
    # zoned policy (docs/networking.md: rules, or ["open"]); absent, none.
    # The SDK's allow_internet_access=True gets all of it, its network
    # option narrows it, nothing widens it.
    net: Annotated[list[str], msgspec.Meta(max_length=256)] | None = None

    def __post_init__(self) -> None:
        if self.net is not None:
            try:
                parse_policy(self.net)
            except InvalidRequest as exc:
                raise ValueError(f"e2b template net: {exc.message}") from None


def _default_templates() -> dict[str, E2bTemplate]:
    return {"base": E2bTemplate()}


class E2bConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The E2B-compatible endpoint (docs/e2b.md): off unless enabled, keys required."""

    enabled: bool = False
    # A host address ("127.0.0.1:49982", "[::1]:49982") or a Unix socket path.
    listen: str = "127.0.0.1:49982"
    keys: list[E2bKey] = msgspec.field(default_factory=list)
    # Template names callers may ask for; "base" is the SDK's default.
    templates: dict[
        Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")],
        E2bTemplate,
    ] = msgspec.field(default_factory=_default_templates)
    # A sandbox's life when the caller names none, and the most it may ask for.
    default_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=86400 * 30)] = 300
    max_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=86400 * 30)] = 86400
    # The largest file upload (POST /files), and the largest file download.
    max_upload_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**31)] = 32 * 1024 * 1024
    max_download_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**34)] = 256 * 1024 * 1024
    # Sandboxes at once per key owner.
    max_sandboxes_per_owner: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 20

    def __post_init__(self) -> None:
        try:
            parse_listen_address(self.listen)
        except ValueError as exc:
            raise ValueError(f"e2b.listen: {exc}") from None
        if self.enabled and not self.keys:
            raise ValueError(
                "e2b.enabled needs at least one [[e2b.keys]] entry: the endpoint never"
                " serves callers without an API key"
            )
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("e2b.keys: two keys have the same name")
        digests = [key.key_sha256 for key in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("e2b.keys: the same key is listed twice")
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("e2b.default_timeout_s is above e2b.max_timeout_s")
        if not self.templates:
            raise ValueError("e2b.templates: at least one template is needed")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings of one zoned daemon; every field has a production default."""

    # Control socket: mode 0660, owned by ``socket_group``.
    socket_path: str = "/run/zoned/zoned.sock"
    socket_group: str = "zoned"
    # Persistent zone records and the kernel store.
    state_dir: str = "/var/lib/zoned"
    kernel_store: str = str(DEFAULT_STORE)
    # Built zone boot images (the agent's initramfs), cached by content hash.
    image_cache: str = "/var/lib/zoned/images"
    # Per-zone runtime files: agent channel sockets, boot images.
    runtime_dir: str = "/run/zoned"
    # Per-zone serial console logs.
    log_dir: str = "/var/log/zoned"
    # Where libvirtd logs each domain's QEMU (<domain>.log): read when a zone
    # fails, for QEMU's own last words.
    libvirt_log_dir: str = "/var/log/libvirt/qemu"
    libvirt_uri: str = "qemu:///system"
    # Every zone's libvirt domain is named <domain_prefix><zone>. Daemons that
    # share one libvirtd (tests, benchmarks, several checkouts) use distinct
    # prefixes so that their domains never collide.
    domain_prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9]{0,15}-\Z")] = "zoned-"
    # "auto" decides by a probe boot; "kvm" or "tcg" forces the accelerator.
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    machine: Literal["microvm", "q35"] = "microvm"
    # Host CPUs kept for the host itself and for QEMU's emulator threads.
    reserved_cpus: list[int] = msgspec.field(default_factory=list)
    # Host memory (MiB) never handed to zones.
    reserved_memory_mib: int = 1024
    # Limits applied to create requests.
    max_vcpus: int = 64
    max_memory_mib: int = 65536
    # A floor above zoned.sizes' measured minimum of each profile and machine
    # (which always holds: smaller zones cannot boot).
    min_memory_mib: int = 0
    # How long a zone may take from start to its agent's hello.
    boot_timeout_s: float = 60.0
    # How long the agent may stay silent before the zone is failed.
    agent_silence_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    # Largest control-socket frame, in bytes.
    max_frame_bytes: int = 4 * 1024 * 1024
    # Concurrent blocking libvirt calls (define, start, pin, destroy, stats
    # of many zones at once); 0: one per host CPU, at least 4, so that
    # concurrent creates scale with the host. libvirtd itself serves one
    # connection at most max_client_requests (libvirtd.conf, default 5)
    # calls at once: on a larger host, raise that too.
    libvirt_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    log_format: Literal["text", "json"] = "text"
    # Each zone's QEMU runs as a uid and gid of its own (the same number),
    # taken from zone_uid_base .. zone_uid_base + zone_uid_count - 1; the first
    # is the accelerator probe's. The range must hold no user, group or
    # subordinate id of the host: the daemon checks at start and refuses a
    # range that overlaps. The default, 0x78000000, lies in the range systemd
    # leaves unused (1879048192-2147483647, https://systemd.io/UIDS-GIDS/),
    # away from system and regular users, dynamic users and the container
    # ranges of systemd-nspawn.
    zone_uid_base: Annotated[int, msgspec.Meta(ge=1000, le=MAX_ZONE_UID)] = 0x78000000
    zone_uid_count: Annotated[int, msgspec.Meta(ge=2, le=2**24)] = 65536
    # Members of this group see and act on every zone, as root does; others
    # only on the zones they created. "": nobody but root.
    admin_group: str = ""
    # Each QEMU's cgroup: a memory hard limit of the zone's memory plus this
    # (QEMU itself; under TCG its translation cache), and a limit on its tasks
    # (threads count: a 1-vCPU zone runs about 5, more while it does disk IO).
    qemu_memory_overhead_mib: Annotated[int, msgspec.Meta(ge=64, le=65536)] = 512
    qemu_pids_limit: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 256
    # Memory given back (docs/fast-start.md): a virtio balloon with free page
    # reporting in every zone (the guest hands free pages back to the host),
    # and under TCG a bound on QEMU's translation cache in MiB (0: QEMU's
    # default, 1 GiB; below 32 Python workloads thrash it).
    free_page_reporting: bool = True
    tcg_tb_cache_mib: Annotated[int, msgspec.Meta(ge=0, le=65536)] = 64
    # Where the host's cgroup hierarchies are mounted.
    cgroup_root: str = "/sys/fs/cgroup"
    # Workload images (docs/images.md). The image store: OCI images converted
    # to one read-only EROFS root each, shared by every zone that uses it.
    image_store: str = "/var/lib/zoned/oci"
    # The image of a zone that names none ("builtin": the small built-in root).
    default_image: str = "default"
    # Per-zone scratch disks (the "disk" writable layer): sparse ext4 files,
    # deleted with their zone.
    scratch_dir: str = "/var/lib/zoned/scratch"
    # A scratch disk's size when the request gives none, and the largest one.
    default_scratch_mib: Annotated[int, msgspec.Meta(ge=16)] = 4096
    max_scratch_mib: Annotated[int, msgspec.Meta(ge=16)] = 65536
    # The largest archive a client may upload for an import, and the largest
    # blob (layer) a pull or import may hold.
    max_image_mib: Annotated[int, msgspec.Meta(ge=1)] = 16384
    # Imports and pulls run in the image helper (zoned.images.helper), a
    # process with the rights conversion needs: "" starts one per import as a
    # child of the daemon; a path connects to a socket-activated helper
    # instead (systemd/zoned-image-helper.socket).
    image_helper_socket: str = ""
    # Imports and pulls running at once; more wait their turn.
    max_image_imports: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    # Zone networks (docs/networking.md). Like domain_prefix, each daemon on a
    # host needs its own table, link prefix and pools: test daemons get theirs
    # from zoned.localdaemon. Slot n of the pools is the n-th /30 and /64.
    net_table: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}\Z")] = "zoned"
    net_pool_v4: str = "100.87.0.0/16"
    net_pool_v6: str = "fd7a:6f6e:6564::/48"
    net_link_prefix: Annotated[str, msgspec.Meta(pattern=LINK_PREFIX_PATTERN)] = "zn"
    # The resolvers the zones' resolvers ask ("address" or "address#port");
    # empty: the host's /etc/resolv.conf nameservers.
    net_upstream_dns: list[str] = msgspec.field(default_factory=list)
    # The helper of slot n runs as uid and gid net_helper_uid_base + n.
    net_helper_uid_base: Annotated[int, msgspec.Meta(ge=1000, le=MAX_ZONE_UID)] = 0x7A6E0000
    # Per-zone bounds (connections, rates, pins, timeouts).
    net_limits: NetLimits = NetLimits()
    # Networked zones get IPv6 too (their /64 of net_pool_v6, proxied like
    # IPv4); false on hosts without IPv6 upstream, so that clients do not try
    # AAAA answers first.
    net_ipv6: bool = True

    # -- Observability (docs/observability.md) --
    # The Prometheus endpoint (GET /metrics): off unless enabled. It listens
    # on a host address ("127.0.0.1:9469", "[::1]:9469"; loopback by default)
    # or on a Unix socket (an absolute path; mode 0660, socket_group's).
    metrics_enabled: bool = False
    metrics_listen: str = "127.0.0.1:9469"
    # libvirt's statistics are reused for this long; a scrape waits at most
    # metrics_stats_wait_s for a fresh sample, else gets the last one.
    metrics_stats_max_age_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 2.0
    metrics_stats_wait_s: Annotated[float, msgspec.Meta(gt=0.0, le=60.0)] = 1.0
    # The audit trail: log_dir/audit.jsonl, rotated when it would pass
    # audit_max_bytes; audit_max_files files are kept (the current one too).
    audit_max_bytes: Annotated[int, msgspec.Meta(ge=4096, le=2**40)] = 16 * 1024 * 1024
    audit_max_files: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    # "auto": audit records also go to the systemd journal when journald's
    # socket exists (the daemon says at start whether it found one); "off".
    audit_journal: Literal["auto", "off"] = "auto"
    journal_socket: str = "/run/systemd/journal/socket"
    # A gone zone's logs (console, audit records, events) stay this long,
    # and all gone zones' logs together within these totals: past any, the
    # oldest go first. Checked every log_retention_interval_s and after
    # each destroy.
    log_retention_s: Annotated[float, msgspec.Meta(ge=0.0)] = 7 * 86400.0
    log_retention_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024 * 1024
    log_retention_max_zones: Annotated[int, msgspec.Meta(ge=0)] = 1000
    log_retention_interval_s: Annotated[float, msgspec.Meta(gt=0.0)] = 60.0
    # Evidence bundles of quarantined zones: root's alone (mode 0700), never
    # under runtime_dir (which zones' QEMUs reach).
    evidence_dir: str = "/var/lib/zoned/evidence"

    # -- Warm pools (docs/fast-start.md): [pools.<name>] tables of PoolSpec's
    # fields. `zonectl pool set|rm` changes them at runtime; those changes
    # are kept in state_dir/pools.json and win over this table's entries.
    pools: Annotated[dict[PoolName, PoolSpec], msgspec.Meta(max_length=MAX_POOLS)] = {}
    # After failed refills in a row a pool waits 2, 4, 8 ... s, at most this.
    pool_backoff_max_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 300.0
    # After a zone was taken from a pool, its refill waits this long: a boot
    # beside the caller's first commands slows them where cores are few.
    pool_refill_delay_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 0.0

    # -- The E2B-compatible endpoint (docs/e2b.md): a [e2b] table.
    e2b: E2bConfig = msgspec.field(default_factory=E2bConfig)

    def __post_init__(self) -> None:
        last = self.zone_uid_base + self.zone_uid_count - 1
        if last > MAX_ZONE_UID:
            raise ValueError(
                f"zone_uid_base + zone_uid_count - 1 = {last} is above {MAX_ZONE_UID}:"
                " uids above 2^31 - 1 are negative to the tools that treat them as signed"
            )
        try:
            parse_listen_address(self.metrics_listen)
        except ValueError as exc:
            raise ValueError(f"metrics_listen: {exc}") from None
        evidence = Path(self.evidence_dir)
        if not evidence.is_absolute():
            raise ValueError(f"evidence_dir must be an absolute path, got {self.evidence_dir!r}")
        runtime = Path(self.runtime_dir)
        if evidence == runtime or runtime in evidence.parents:
            raise ValueError(
                f"evidence_dir {self.evidence_dir} is inside runtime_dir {self.runtime_dir},"
                " which zones' QEMUs reach"
            )


def load_config(path: Path | None) -> Config:
    """Read and validate the config file; a missing default file means defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from exc


def libvirt_threads(config: Config, host_cpus: int) -> int:
    """How many blocking libvirt calls may run at once: ``libvirt_threads``,
    or (0) one per CPU the daemon may use, at least 4."""
    return config.libvirt_threads or max(4, host_cpus)
