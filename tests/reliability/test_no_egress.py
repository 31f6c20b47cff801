"""No egress: the whole local stack (redis-server, Ray's processes, every Serve replica, the
HTTP traffic, an admin upload) runs under strace, and every connect/sendto/sendmsg with an
internet address must go to loopback. AF_UNIX, AF_NETLINK and AF_UNSPEC are local."""
from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STACK = Path(__file__).with_name("egress_stack.py")
# One traced call's socket address, as strace prints it (IPv4 and IPv6).
INET = re.compile(r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
INET6 = re.compile(r'sa_family=AF_INET6, sin6_port=htons\((\d+)\),.*?inet_pton\(AF_INET6, "([^"]+)"')
CALL = re.compile(r"^(\d+)\s+(connect|sendto|sendmsg)\(")


def inet_destinations(log: str) -> list[tuple[int, str, str, int]]:
    """(pid, syscall, address, port) of every traced call that names an IPv4/IPv6 address."""
    out = []
    for line in log.splitlines():
        call = CALL.match(line)
        if not call:
            continue
        for pattern in (INET, INET6):
            for port, addr in pattern.findall(line):
                out.append((int(call.group(1)), call.group(2), addr, int(port)))
    return out


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_parser_sees_foreign_addresses():
    log = ('12 connect(3, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("10.1.2.3")}, 16) = 0\n'
           '13 sendto(5, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), '
           'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = 1\n'
           '14 connect(7, {sa_family=AF_UNIX, sun_path="/tmp/x"}, 110) = 0\n'
           '15 connect(8, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16 '
           '<unfinished ...>\n')
    found = inet_destinations(log)
    assert found == [(12, "connect", "10.1.2.3", 443), (13, "sendto", "2001:db8::1", 53),
                     (15, "connect", "127.0.0.1", 6379)]
    assert [is_loopback(a) for _, _, a, _ in found] == [False, False, True]
    assert is_loopback("::1") and is_loopback("::ffff:127.0.0.1") and not is_loopback("0.0.0.0")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (cluster/setup.sh installs it)")
def test_local_stack_talks_to_loopback_only(tiny_zoo, tmp_path):
    log_file = tmp_path / "strace.log"
    cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect,sendto,sendmsg", "-e", "signal=none",
           "-s", "0", "-o", str(log_file), sys.executable, str(STACK), str(tiny_zoo.root), str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
    found = inet_destinations(log_file.read_text(errors="replace"))
    foreign = sorted({(call, addr, port) for _, call, addr, port in found if not is_loopback(addr)})
    print(f"EGRESS-REPORT {len(found)} inet calls from {len({pid for pid, *_ in found})} processes and threads; "
          f"foreign: {foreign}")
    # The trace really covered the cluster: many processes, Redis and HTTP on loopback.
    assert len({pid for pid, *_ in found}) >= 4 and len(found) >= 20
    assert foreign == [], f"calls to non-loopback addresses: {foreign}"
