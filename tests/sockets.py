"""Who listens where: the listening TCP sockets of a process and its descendants, read from /proc (Linux).

Used to check that a local Ray cluster (GCS, raylet, object manager, workers, agents, metrics) is reachable from
loopback only, whatever names or ports Ray gives its processes.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str                    # the process's comm name (gcs_server, raylet, ray::IDLE, ...)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @property
    def loopback_only(self) -> bool:
        a = self.address
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        return a.is_loopback

    def __str__(self) -> str:
        return f"{self.name}[{self.pid}] {self.address}:{self.port}"


def descendants(root: int) -> set[int]:
    """root and every process below it (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])      # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:                           # the process ended meanwhile
        pass
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # the kernel prints each 32-bit word in host (little-endian) order
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening_by_inode() -> dict[int, tuple]:
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != TCP_LISTEN:
                continue
            host, port = fields[1].split(":")
            out[int(fields[9])] = (_address(host), int(port, 16))
    return out


def listeners(root: int) -> list[Listener]:
    """Every listening TCP socket held by root or a process below it."""
    table = _listening_by_inode()
    found = set()
    for pid in descendants(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for inode in _socket_inodes(pid) & table.keys():
            found.add(Listener(pid, name, *table[inode]))
    return sorted(found, key=lambda x: (x.name, x.port))
