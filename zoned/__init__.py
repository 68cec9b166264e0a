"""zoned: run untrusted workloads in zones, small VMs with their own hardened kernel.

The package in layers, lowest first. A module may import from its own layer
and the layers above it in this list, never from one below; ``../shared/DESIGN.md``
is the picture, ``docs/`` one page per topic.

1. **The wire and the pure core**: plain, synchronous, deterministic code
   that imports the standard library, msgspec and this layer only, never
   trio, libvirt, subprocess or socket (``tests/unit/test_pure_imports.py``
   checks it in a fresh interpreter).

   - :mod:`zoned.errors`: the one exception family; each class carries its
     wire code.
   - :mod:`zoned.protocol`: every message of the control socket and of the
     agent channel, the framing, the limits.
   - :mod:`zoned.lifecycle`: the zone state machine and the predicates on
     zone states (settled, terminal, running a domain, ready).
   - :mod:`zoned.conversation`: the rules of one control-socket connection
     (hello first, in-flight cap, stream input), sans-IO.
   - :mod:`zoned.access`: the caller of a request and what it may see and
     do (zones have owners; administrators see all).
   - :mod:`zoned.zoneids`: each zone's QEMU uid from a reserved range, and
     the range's clashes with the host's accounts (reading them is in the
     same module, as functions).
   - :mod:`zoned.records`: the persisted zone record.
   - :mod:`zoned.probecache`: the accelerator probe's verdict and the key it
     holds under (reading the host's part of the key is in the same module,
     as functions).
   - :mod:`zoned.placement`, :mod:`zoned.topology` (its parsers; reading the
     live host is in the same module, behind lazy imports): CPUs and memory.
   - :mod:`zoned.domain`: libvirt domain XML from typed values.
   - :mod:`zoned.kernel.cmdline`, :mod:`zoned.kernel.kconfig`: the guest
     kernel's command line and config merging.
   - :mod:`zoned.cpio`: the initramfs writer.
   - :mod:`zoned.sizes`: the smallest zone each profile and machine boots.
   - :mod:`zoned.failures`: why a zone failed, from what it left behind.
   - :mod:`zoned.credit`: the credit window both ends of the agent channel
     count exec output and input with (standard library only: the agent
     loads it).
   - :mod:`zoned.net.policy`, :mod:`zoned.net.sniff`,
     :mod:`zoned.net.addressing`, :mod:`zoned.net.nftrules`,
     :mod:`zoned.net.pins`, :mod:`zoned.net.accounting`,
     :mod:`zoned.net.wire`: zone networks' policy, SNI/Host sniffing,
     addresses, our nftables table, DNS pins, counters and rate limits, the
     helper's messages.

2. **The guest agent**, :mod:`zoned.agent`: PID 1 inside a zone. Its
   modules import the standard library, msgspec, :mod:`zoned` (the version),
   :mod:`zoned.errors`, :mod:`zoned.protocol` and :mod:`zoned.credit`,
   nothing else of zoned (not trio), and keep their start-up imports lean:
   they are on every zone's boot path. Two exceptions point the other way, both for the wire between
   host and agent: any layer may read the constants of ``zoned/agent/__init__.py``
   (the agent's name, its port name), and the boot image builder imports
   :mod:`zoned.agent.init` to learn what the agent loads.

3. **Host services**, each wrapping one outside thing in typed calls:
   :mod:`zoned.virt` (the only importer of libvirt), :mod:`zoned.hostwatch`
   (the only importer of pyudev), :mod:`zoned.store` (record files),
   :mod:`zoned.events`, :mod:`zoned.agentlink` (the agent channel, host
   side), :mod:`zoned.config`, :mod:`zoned.hostinfo`, :mod:`zoned.kernel`
   (the store of built kernels and the ``zoned-kernel`` build tool),
   :mod:`zoned.images` (the boot image, the workload root, the integrity
   check of every shared image; blocking: called from worker threads),
   :mod:`zoned.cgroups` (each QEMU's task limit), :mod:`zoned.postmortem`
   (what a failed zone left: console, QEMU's log, the host's kernel log),
   :mod:`zoned.net.host`
   (taps, our nftables table, the zones' network helpers); for observability
   :mod:`zoned.httpserve` (HTTP/1.1 on trio, the only importer of h11),
   :mod:`zoned.metrics` (the only importer of prometheus-client),
   :mod:`zoned.audit` and :mod:`zoned.journal` (the audit trail, journald),
   :mod:`zoned.zonelogs` (zones' log directories and their retention),
   :mod:`zoned.evidence` (quarantine bundles). A zone's network
   helper is a process of its own: :mod:`zoned.net.helper` runs
   :mod:`zoned.net.engine` (the resolver and proxy on trio) and
   :mod:`zoned.net.dnsfilter` (pure decisions on dnspython's messages, which
   load ``socket``).

4. **The daemon**: :mod:`zoned.zones` (the zone manager), :mod:`zoned.workloads`
   (exec and run), :mod:`zoned.server` (the control socket's IO),
   :mod:`zoned.monitor` (audit records, process events, counters, the
   metrics endpoint, log retention), :mod:`zoned.quarantine`,
   :mod:`zoned.daemon` (wiring, start-up order, request dispatch). One
   ``trio.run``; blocking work goes to worker threads.

5. **Clients**: :mod:`zoned.client` (async and sync), :mod:`zoned.cli`
   (``zonectl``) and :mod:`zoned.mcp` (``zoned-mcp``, the MCP server; the
   only importer of the ``mcp`` SDK, an optional extra). They import layer 1
   and trio, never the daemon's modules or libvirt.

   The E2B-compatible endpoint, :mod:`zoned.e2b`, is a client of this kind
   that the daemon serves: its pure half (:mod:`zoned.e2b.connectrpc`,
   :mod:`zoned.e2b.envd`, :mod:`zoned.e2b.api`) is layer 1's kind of code;
   its shell (:mod:`zoned.e2b.processes`, :mod:`zoned.e2b.service`) uses
   the client, :mod:`zoned.httpserve`, :mod:`zoned.store` and
   :mod:`zoned.config`, never the daemon's modules: :mod:`zoned.daemon`
   (its only importer) hands it a function that opens a control connection
   of the daemon's own for a caller (:func:`zoned.server.open_own_connection`).

6. **Host tools**, outside the daemon: :mod:`zoned.hostsetup`,
   :mod:`zoned.supervisor`, :mod:`zoned.localdaemon` (a private daemon for
   tests and benchmarks), :mod:`zoned.bareboot` (QEMU without libvirt, the
   benchmarks' baseline), :mod:`zoned.demo`.
"""

#: The one version of zoned: the package's (pyproject.toml reads it), the
#: daemon's hello, the agent's name.
__version__ = "0.1.0"
