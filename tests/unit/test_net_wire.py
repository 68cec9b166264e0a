"""Messages to and from a zone's network helper, and the host shell's pure helpers."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio

from zoned.net import host, wire
from zoned.net.accounting import NetCounters, RefusedEvent
from zoned.net.addressing import NetPools, zone_addressing
from zoned.net.host import _add_counters, link_alias, load_pins, resolv_conf_nameservers, save_pins
from zoned.net.policy import NetPolicy, ZoneNetSpec, parse_policy, parse_publish


def test_messages_round_trip() -> None:
    setup = wire.Setup(
        zone="web",
        addressing=zone_addressing(NetPools(), 3),
        policy=parse_policy(["pypi.org:443", "udp://203.0.113.5:123"]),
        extra_refused=[],
        upstream_dns=["198.51.100.53", "2001:db8::53#5353"],
        proxy_fds=[0, 1],
        dns_udp_fds=[2, 3],
        dns_tcp_fds=[4, 5],
        publishes=[parse_publish("8080:80")],
        publish_fds=[6],
    )
    pins = [wire.Pin("203.0.113.9", "pypi.org", 12.5)]
    messages = (
        setup,
        wire.SeedPins(pins=pins),
        wire.SetPolicy(seq=1, policy=parse_policy(["open"])),
        wire.GetCounters(seq=2),
    )
    for message in (*messages, wire.Stop()):
        assert wire.decode_to_helper(wire.encode(message)) == message
    event = RefusedEvent(
        time=1.5, kind="sni", destination="198.51.100.10", port=443, rule="sni-mismatch"
    )
    for reply in (
        wire.Ready(pid=7),
        wire.Applied(seq=1, closed=2),
        wire.Counters(counters=NetCounters(bytes_in=5), pins=3),
        wire.Refused(event=event),
        wire.Pinned(pins=pins),
    ):
        assert wire.decode_from_helper(wire.encode(reply)) == reply


def test_hostile_helper_messages_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        wire.decode_from_helper(msgspec.msgpack.encode({"type": "setup", "zone": "x"}))
    with pytest.raises(msgspec.ValidationError):
        wire.decode_from_helper(msgspec.msgpack.encode({"type": "ready", "pid": 1, "extra": 2}))
    with pytest.raises(msgspec.ValidationError, match="too long"):
        wire.decode_from_helper(b"\x00" * (wire.MAX_MESSAGE + 1))
    with pytest.raises(msgspec.DecodeError):
        wire.decode_from_helper(b"\xc1")
    too_many = [["203.0.113.9", "a.org", 1.0]] * (wire.PINS_PER_MESSAGE + 1)
    with pytest.raises(msgspec.ValidationError):
        wire.decode_from_helper(msgspec.msgpack.encode({"type": "pinned", "pins": too_many}))


def test_counters_survive_helper_restarts() -> None:
    base = NetCounters(bytes_in=10, connections_allowed=2, connections_active=0)
    live = NetCounters(bytes_in=5, connections_allowed=1, connections_active=3)
    total = _add_counters(base, live)
    assert (total.bytes_in, total.connections_allowed, total.connections_active) == (15, 3, 3)


def test_upstream_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# x\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch a\n"
    )
    assert resolv_conf_nameservers(conf) == ["192.0.2.53", "fe80::1"]
    assert resolv_conf_nameservers(tmp_path / "missing") == []
    assert link_alias("zoned-", "web") == "zoned:zoned-:web"


def test_saved_pins_load_back_and_a_bad_file_is_nothing(tmp_path: Path) -> None:
    path = tmp_path / "zn0.pins"
    pins = [
        wire.Pin("198.51.100.10", "allowed.test", 123.5),
        wire.Pin("2001:db8::1", "a.test", 9.0),
    ]
    save_pins(path, pins)
    assert load_pins(path) == pins
    assert load_pins(tmp_path / "missing.pins") == []
    path.write_bytes(b"\x93garbage")
    assert load_pins(path) == []
    path.write_bytes(msgspec.msgpack.encode([["1.2.3.4", "x" * 300, 1.0]]))  # a name too long
    assert load_pins(path) == []


async def test_a_zone_removed_while_pins_were_saved_leaves_no_pins_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nethost = host.NetHost(host.NetHostConfig(runtime_dir=str(tmp_path)))
    nets = []
    for slot, zone in enumerate(("a", "b")):
        spec = ZoneNetSpec(zone=zone, slot=slot, policy=NetPolicy())
        net = host._ZoneNet(spec, zone_addressing(nethost.config.pools, slot), [], [])
        net.pins_dirty = True
        nethost._zones[zone] = net
        nets.append(net)
    saved = []

    def save(path: Path, pins: list[wire.Pin]) -> None:
        saved.append(path)
        if len(saved) == 1:  # b's teardown runs meanwhile: its file is unlinked, it leaves
            nethost._zones.pop("b")
        save_pins(path, pins)

    monkeypatch.setattr(host, "PIN_SAVE_INTERVAL_S", 0.0)
    monkeypatch.setattr(host, "save_pins", save)
    with trio.move_on_after(0.5):
        await nethost._keep_pins()
    a, b = (nethost._pins_path(net.addressing) for net in nets)
    assert saved[:2] == [a, b] and a.exists() and not b.exists()
