"""The guest agent: the zone's PID 1, speaking :mod:`zoned.protocol` over virtio-serial.

This package runs inside the zone, from the boot image that
:mod:`zoned.images.bootimage` builds; it is on every zone's boot path, so it imports
nothing beyond what it needs (see :mod:`zoned.agent.init`).

Its modules, in the order the agent needs them:

- :mod:`~zoned.agent.init`: the entry point (``main``) and the start-up order;
- :mod:`~zoned.agent.system`: PID 1's own system (console, mounts, stdio,
  signals, hostname, reaping orphans, the workload root);
- :mod:`~zoned.agent.channel`: the virtio-serial port, its handshake and the
  one poll loop; :mod:`~zoned.agent.hello` encodes the first frame without
  msgspec;
- after the hello: :mod:`~zoned.agent.metrics` (the heartbeat's guest
  figures), :mod:`~zoned.agent.execs` (the processes: stdio, credit, exits),
  which starts each with :mod:`~zoned.agent.spawn` (pipes or a terminal,
  fork, the child's set-up, exec) in a cgroup of :mod:`~zoned.agent.cgroups`.
"""

from zoned import __version__

#: The agent's name and build, reported in ``AgentHello.agent``.
AGENT_NAME = f"zoned-agent/{__version__}"
#: Name of the virtio-serial port the agent serves (the host side is a unix socket).
AGENT_PORT_NAME = "org.zoned.agent.0"
#: The agent's own tools in its boot image: Debian's static busybox (``agent_tools``).
AGENT_BUSYBOX = "/bin/busybox"
