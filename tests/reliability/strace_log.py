"""Reading an `strace -f -xx` log of the network calls: where each call went, and which names
were looked up in DNS (read from the query bytes, whatever resolver they went to).

    strace -f --seccomp-bpf -qq -e trace=connect,sendto,sendmsg,sendmmsg -e signal=none -s 300 -xx ...

A resolver on loopback (systemd-resolved's 127.0.0.53) forwards what it cannot answer, so a
query sent there for an outside name is an attempt to reach outside, and the address alone
cannot tell: the query's name does."""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

TRACE = ["-f", "--seccomp-bpf", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-e", "signal=none",
         "-s", "300", "-xx"]
# One traced call's socket address, as strace prints it (IPv4 and IPv6).
INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
INET6 = re.compile(r'sa_family=AF_INET6, sin6_port=htons\((\d+)\),.*?inet_pton\(AF_INET6, "([^"]+)"')
CALL = re.compile(r"^(\d+)\s+(connect|sendto|sendmsg|sendmmsg)\((\d+),")
RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (connect|sendto|sendmsg|sendmmsg) resumed>")
BUFFER = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')  # with -xx every byte is \xHH
HEX_BYTE = re.compile(r"\\x([0-9a-f]{2})")
DNS_PORT = 53


@dataclass(frozen=True)
class Lookup:
    tid: int
    resolver: str  # address:port the query went to
    name: str | None  # None: a DNS socket was used but no query could be read


def calls(log: str):
    """(tid, syscall, fd, text) per traced call; a call split by another thread (`<unfinished ...>`
    then `<... resumed>`) yields both halves with the fd of its first half."""
    open_calls: dict[int, tuple[str, int]] = {}
    for line in log.splitlines():
        if m := CALL.match(line):
            tid, call, fd = int(m.group(1)), m.group(2), int(m.group(3))
            if line.endswith("<unfinished ...>"):
                open_calls[tid] = (call, fd)
            yield tid, call, fd, line
        elif (m := RESUMED.match(line)) and int(m.group(1)) in open_calls:
            tid = int(m.group(1))
            call, fd = open_calls.pop(tid)
            yield tid, call, fd, line


def addresses(text: str) -> list[tuple[str, int]]:
    """(address, port) of the socket addresses in one call's text (-xx writes them as \\xHH too)."""
    return [(HEX_BYTE.sub(lambda m: chr(int(m.group(1), 16)), addr), int(port))
            for pattern in (INET, INET6) for port, addr in pattern.findall(text)]


def inet_destinations(log: str) -> list[tuple[int, str, str, int]]:
    """(tid, syscall, address, port) of every traced call that names an IPv4/IPv6 address."""
    return [(tid, call, addr, port) for tid, call, _, text in calls(log) for addr, port in addresses(text)]


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def dns_question(payload: bytes) -> str | None:
    """The name a DNS query asks for (UDP wire format); None if the bytes are not one."""
    if len(payload) < 17 or payload[2] & 0x80 or payload[4:6] == b"\x00\x00":  # a reply, or no question
        return None
    labels, i = [], 12
    while i < len(payload) and payload[i]:
        n = payload[i]
        if n > 63 or i + 1 + n > len(payload):
            return None
        labels.append(payload[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels) if i < len(payload) else None


def dns_lookups(log: str) -> list[Lookup]:
    """Every DNS query sent: on a socket connected to port 53, or sent to port 53 directly."""
    resolver_of: dict[tuple[int, int], str] = {}  # (tid, fd) -> resolver, from connect()
    found: list[Lookup] = []
    for tid, call, fd, text in calls(log):
        to_53 = [f"{a}:{p}" for a, p in addresses(text) if p == DNS_PORT]
        if call == "connect":
            if to_53:
                resolver_of[(tid, fd)] = to_53[0]
                found.append(Lookup(tid, to_53[0], None))  # replaced by the names sent on it
            else:
                resolver_of.pop((tid, fd), None)  # the fd now points elsewhere
            continue
        resolver = to_53[0] if to_53 else resolver_of.get((tid, fd))
        if resolver is None:
            continue
        names = [dns_question(bytes.fromhex(b.replace("\\x", ""))) for b in BUFFER.findall(text)]
        found = [f for f in found if not (f.tid == tid and f.resolver == resolver and f.name is None)]
        found += [Lookup(tid, resolver, name) for name in names or [None]]
    return found


def is_local_name(name: str | None) -> bool:
    """localhost and this machine's own name (with a search domain the resolver appends)."""
    if name is None:
        return False
    name, own = name.rstrip(".").lower(), socket.gethostname().lower()
    return name == "localhost" or name.endswith(".localhost") or name == own or name.startswith(own + ".")
