"""The tests' "internet": DNS, HTTP and HTTPS servers, run inside the world's namespace.

``python -m tests.integration.networld_servers CONFIG.json`` (under ``ip netns
exec``): serves until killed. The config names the DNS listen address and
records, the HTTP(S) addresses, and the certificate. Each HTTP(S) answer is
``<server address> <Host header> <path>``, so tests can see where they got.
"""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import ssl
import sys
import threading
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            size = min(int(self.path.split("/")[2]), 1 << 30)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                self.wfile.write(part)
                sent += len(part)
            return
        address = str(self.server.server_address[0])  # type: ignore[index]
        body = f"{address} {self.headers.get('Host', '')} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _http(address: str, port: int, context: ssl.SSLContext | None) -> None:
    cls = _Server6 if ":" in address else _Server
    server = cls((address, port), _Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _answer(records: dict[str, list[list[str]]], wire: bytes) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    response = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    entries = records.get(name)
    if entries is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
    for rdtype, value in entries:
        if rdtype == "CNAME" or rdtype == dns.rdatatype.to_text(question.rdtype):
            rrset = dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, rdtype, value)
            response.answer.append(rrset)
            if rdtype == "CNAME":
                target = value.rstrip(".").lower()
                for sub_type, sub_value in records.get(target, []):
                    if sub_type == dns.rdatatype.to_text(question.rdtype):
                        response.answer.append(
                            dns.rrset.from_text(value, 60, dns.rdataclass.IN, sub_type, sub_value)
                        )
    return response.to_wire()


def _dns(address: str, records: dict[str, list[list[str]]]) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((address, 53))

    def serve_udp() -> None:
        while True:
            wire, peer = udp.recvfrom(4096)
            reply = _answer(records, wire)
            if reply is not None:
                udp.sendto(reply, peer)

    threading.Thread(target=serve_udp, daemon=True).start()


def _server_first(address: str, port: int) -> None:
    """A banner first (like SSH), then an echo of one line."""
    listener = socket.create_server((address, port))

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"SSH-2.0-world\r\n")
            conn.sendall(conn.recv(1024))

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config["cert"], config["key"])
    for address in config["web"]:
        _http(address, 80, None)
        _http(address, 443, context)
    _dns(config["dns"], config["records"])
    _server_first(config["web"][0], 2222)
    print("serving", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
