"""The guest agent's host-testable parts: its msgspec-free hello, its message handling,
its lean boot path and its signals.

The exec engine runs real processes: see test_agent_exec.py.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import zoned
import zoned.agent
import zoned.agent.channel
import zoned.agent.system
from zoned import protocol
from zoned.agent import AGENT_NAME, hello
from zoned.agent.channel import MAX_PENDING_OUTPUT, AgentChannel
from zoned.agent.execs import sanitize
from zoned.images.bootimage import trace_agent_modules
from zoned.images.hostfiles import base_interpreter
from zoned.protocol import (
    AGENT_MAX_FRAME,
    MAX_EXEC_CHUNK,
    AgentExecExit,
    AgentExecOutput,
    AgentHello,
    AgentSetHostname,
    AgentToHost,
    FrameDecoder,
    Heartbeat,
    HeartbeatReply,
    decode_from_agent,
    encode_frame,
)

_tokens = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


def test_hello_version_is_the_protocols() -> None:
    assert hello.AGENT_PROTOCOL_VERSION == protocol.AGENT_PROTOCOL_VERSION


@given(
    agent=_tokens.filter(lambda s: len(s) <= 64),
    kernel_release=_tokens.filter(lambda s: len(s) <= 64),
    boot_s=st.floats(min_value=0.0, max_value=1e10),
    pid=st.integers(min_value=1, max_value=2**31 - 1),
)
def test_hello_frame_is_exactly_what_msgspec_encodes(
    agent: str, kernel_release: str, boot_s: float, pid: int
) -> None:
    expected = AgentHello(
        version=protocol.AGENT_PROTOCOL_VERSION,
        agent=agent,
        kernel_release=kernel_release,
        boot_s=boot_s,
        pid=pid,
    )
    frame = hello.encode_hello_frame(
        agent=agent, kernel_release=kernel_release, boot_s=boot_s, pid=pid
    )
    assert frame == encode_frame(expected, AGENT_MAX_FRAME)
    assert decode_from_agent(frame[4:]) == expected


def _messages(data: bytes) -> list[AgentToHost]:
    decoder = FrameDecoder(AGENT_MAX_FRAME)
    decoder.feed(data)
    out: list[AgentToHost] = []
    while (payload := decoder.next_frame()) is not None:
        out.append(decode_from_agent(payload))
    return out


def _channel() -> AgentChannel:
    # handle_bytes() only queues output: no port needed.
    return AgentChannel(-1)


def test_heartbeats_are_answered_and_seq_zero_reintroduces_the_agent() -> None:
    channel = _channel()
    frames = encode_frame(Heartbeat(seq=5), AGENT_MAX_FRAME) + encode_frame(
        Heartbeat(seq=0), AGENT_MAX_FRAME
    )
    # Split mid-frame: the decoder must reassemble.
    channel.handle_bytes(frames[:7])
    channel.handle_bytes(frames[7:])
    replies = _messages(channel.pending_output())
    assert [type(m) for m in replies] == [HeartbeatReply, AgentHello, HeartbeatReply]
    first, hello_again, second = replies
    assert isinstance(first, HeartbeatReply) and first.seq == 5
    assert first.mem_total_kib > 0
    assert isinstance(hello_again, AgentHello) and hello_again.agent == AGENT_NAME
    assert isinstance(second, HeartbeatReply) and second.seq == 0


def test_garbage_is_ignored_and_a_broken_header_resets_the_decoder() -> None:
    channel = _channel()
    junk = b"\xc1"  # never valid msgpack
    channel.handle_bytes(len(junk).to_bytes(4, "big") + junk)
    assert channel.pending_output() == b""
    channel.handle_bytes(b"\0\0\0\0")  # length 0: the stream is broken
    channel.handle_bytes(encode_frame(Heartbeat(seq=9), AGENT_MAX_FRAME))
    (reply,) = _messages(channel.pending_output())
    assert isinstance(reply, HeartbeatReply) and reply.seq == 9


def test_exec_messages_are_never_dropped_but_heartbeat_replies_are() -> None:
    channel = _channel()
    big = AgentExecOutput(exec_id=1, stream="stdout", data=b"x" * MAX_EXEC_CHUNK)
    for _ in range(MAX_PENDING_OUTPUT // MAX_EXEC_CHUNK + 2):
        channel.send(big)
    assert len(channel.pending_output()) > MAX_PENDING_OUTPUT
    channel.handle_bytes(encode_frame(Heartbeat(seq=3), AGENT_MAX_FRAME))
    messages = _messages(channel.pending_output())
    assert all(m == big for m in messages)
    assert len(messages) == MAX_PENDING_OUTPUT // MAX_EXEC_CHUNK + 2


@pytest.mark.parametrize("applied", [True, False])
def test_a_new_hostname_is_reported_set_only_when_it_was(
    monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    said: list[str] = []
    monkeypatch.setattr(zoned.agent.channel, "console", said.append)
    monkeypatch.setattr(zoned.agent.system, "apply_hostname", lambda name: applied)
    channel = _channel()
    channel.handle_bytes(encode_frame(Heartbeat(seq=1), AGENT_MAX_FRAME))  # the protocol
    channel.handle_bytes(encode_frame(AgentSetHostname(hostname="web-1"), AGENT_MAX_FRAME))
    assert ("hostname set to web-1" in said) == applied


def test_error_text_is_sanitised_for_the_protocol() -> None:
    assert sanitize("cannot run 'x': No such file") == "cannot run 'x': No such file"
    assert sanitize("caf\u00e9\n\x00\x7f") == "caf????"
    assert len(sanitize("y" * 5000)) == 1024
    decode_from_agent(encode_frame(AgentExecExit(exec_id=1, error=sanitize("\u2603" * 3000)))[4:])


def _every_signal_at_its_default() -> None:
    # As the kernel starts init, whatever this test run ignores (a background
    # job ignores SIGINT and SIGQUIT).
    for signum in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)


def _fresh_interpreter(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=_every_signal_at_its_default,
    )
    return result.stdout


def test_the_agents_boot_path_stays_lean() -> None:
    """Importing the entry module loads no msgspec, no protocol and no exec engine
    (they come after the hello), nothing heavy of the stdlib either."""
    loaded = set(_fresh_interpreter("import sys, zoned.agent.init; print(*sys.modules)").split())
    late = {"zoned.protocol", "msgspec", "zoned.agent.metrics", "zoned.agent.execs"}
    late |= {"zoned.agent.spawn", "zoned.agent.cgroups", "zoned.credit"}
    heavy = {"typing", "re", "contextlib", "traceback", "subprocess", "json", "socket", "trio"}
    assert loaded & (late | heavy) == set()
    ours = {m for m in loaded if m.startswith("zoned")}
    assert ours == {"zoned", "zoned.agent", *(f"zoned.agent.{m}" for m in _BOOT_PATH)}, ours


#: The agent's own modules imported before its hello, and no more (each costs
#: guest boot time under TCG).
_BOOT_PATH = ("init", "channel", "system", "hello")


def test_pid_1_handles_no_signal() -> None:
    """Python's one handler (SIGINT's KeyboardInterrupt) goes: as PID 1, the
    agent is then deaf to every signal a workload sends it."""
    script = (
        "import signal\n"
        "from zoned.agent.system import stop_handling_signals\n"
        "assert callable(signal.getsignal(signal.SIGINT))\n"
        "print(stop_handling_signals())\n"
        "print(sum(callable(signal.getsignal(n)) for n in range(1, signal.NSIG)))\n"
        "print(signal.getsignal(signal.SIGINT) == signal.SIG_DFL)\n"
    )
    restored, handled, default = _fresh_interpreter(script).split("\n")[:3]
    assert restored == f"[{signal.SIGINT}]"
    assert (handled, default) == ("0", "True")


def test_every_agent_module_is_in_the_boot_image(tmp_path: Path) -> None:
    """The image builder's import trace finds every module the agent may load."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "zoned").symlink_to(Path(zoned.__file__).parent)
    (staging / "msgspec").symlink_to(Path(msgspec.__file__).parent)
    traced = {name for name, _ in trace_agent_modules(base_interpreter(), staging).modules}
    agent_dir = Path(zoned.agent.__file__).parent
    modules = {f"zoned.agent.{path.stem}" for path in agent_dir.glob("*.py")} - {
        "zoned.agent.__init__"
    }
    assert modules | {"zoned.agent", "zoned.credit", "zoned.protocol"} <= traced


def test_a_hang_up_drops_the_old_hosts_bytes_and_never_a_new_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hang-up poll() reported can be over by the time the port is read: what a
    new host sent as it connected is kept. The old host's unanswered bytes are
    dropped once, before the console says it left (a host that reconnects on
    that line keeps all it sends)."""
    agent_end, host_end = socket.socketpair()
    with agent_end, host_end:
        agent_end.setblocking(False)

        def unread() -> bytes:
            try:
                return agent_end.recv(1024, socket.MSG_PEEK)
            except BlockingIOError:
                return b""

        said: list[tuple[str, bytes]] = []
        monkeypatch.setattr(zoned.agent.channel, "console", lambda m: said.append((m, unread())))
        channel = AgentChannel(agent_end.fileno())

        host_end.sendall(b"the new host's first frame")
        channel._disconnected()  # never connected: a stale hang-up
        assert unread() == b"the new host's first frame"
        assert said == []

        channel.connected = True
        host_end.sendall(b" and more")
        channel._disconnected()
        assert not channel.connected
        assert unread() == b""
        assert said == [("host disconnected from the agent port", b"")]
        channel._disconnected()  # reported again while no host is there
        assert len(said) == 1
