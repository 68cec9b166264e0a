"""The guest agent: the zone's PID 1, speaking :mod:`zoned.protocol` over virtio-serial.

This package runs inside the zone, from the boot image that
:mod:`zoned.images.bootimage` builds; it is on every zone's boot path, so it imports
nothing beyond what it needs (see :mod:`zoned.agent.init`).
"""

from zoned import __version__

#: The agent's name and build, reported in ``AgentHello.agent``.
AGENT_NAME = f"zoned-agent/{__version__}"
#: Name of the virtio-serial port the agent serves (the host side is a unix socket).
AGENT_PORT_NAME = "org.zoned.agent.0"
