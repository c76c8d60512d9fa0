"""Where a network feed may point: never at this node itself, at link-local addresses, or at the service's own ports.

A feed URL is fetched by the service, so without a check an admin's feed reads whatever the node can reach: Redis,
Ray, the API on loopback, the cloud metadata service at 169.254.169.254 (docs/architecture.md, "Streams and
protocols"). `check_host` resolves the URL's host and checks every address it resolves to:

- loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10), the metadata services outside it and
  unspecified ("this host": 0.0.0.0/8, ::) addresses are refused unless the policy's `allow` names the host or a
  network holding the address;
- an address of this node (or of a service's own host) at one of the service's ports is refused, allowed or not;
- private LAN ranges (10/8, 172.16/12, 192.168/16) and every other address pass: cameras live there;
- udp with no host (`udp://:PORT`, `udp://@:PORT`, or an unspecified one) listens on a port of this node, which
  only `udp_listen` allows.

The reader checks again at every open, so a name that resolves elsewhere later (DNS rebinding) is caught then, and
what FFmpeg fetches on its own over http (redirects, playlist entries) passes `checked_addresses` in the reader's
egress proxy (pipeline/video/egress.py).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.video.protocols import NETWORK_SCHEMES, local_file_path, redact_url, scheme_of

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
_THIS_HOST = ipaddress.ip_network("0.0.0.0/8")      # "this host on this network": Linux connects 0.0.0.0 to itself
# metadata services outside the link-local range (AWS over IPv6, Alibaba Cloud): answered by the node's own host
METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))


@dataclass(frozen=True)
class Service:
    """A port of the service itself (Redis, the API, a Ray port); `host` "" means every address of this node."""
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class HostPolicy:
    allow: tuple[str, ...] = ()              # host names, addresses and CIDRs that may be loopback or link-local
    services: tuple[Service, ...] = ()       # never a feed, whatever `allow` says
    udp_listen: bool = False                 # udp://:PORT (binding a port of this node) allowed


class UnresolvedHost(ValueError):
    """The host name does not resolve (now): at registration an error, at open a source that cannot be reached."""


def check_allow_entry(entry: str) -> str:
    """The entry of an allow list as it is matched (a network in its canonical form, or a lower-case host name);
    ValueError for anything else."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"an allowed host must be a host name, an address or a CIDR, got {entry!r}")
    entry = entry.strip()
    try:
        return str(ipaddress.ip_network(entry, strict=False))
    except ValueError:
        pass
    name = entry.lower().rstrip(".")
    labels = name.split(".")
    if "/" in name or len(name) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and label.isascii()
            for label in labels):
        raise ValueError(f"an allowed host must be a host name, an address or a CIDR, got {entry!r}")
    return name


def check_host(url: str, policy: HostPolicy) -> None:
    """ValueError saying why `url` may not be opened under `policy`; UnresolvedHost when its host does not
    resolve. Local files pass (their folders are check_roots' business)."""
    scheme = scheme_of(url)
    if local_file_path(url) is not None or scheme not in NETWORK_SCHEMES:
        return                  # a local file, or a scheme validate_url refuses
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or DEFAULT_PORTS.get(scheme)
    shown = redact_url(url)
    if scheme == "udp" and (not host or _is_unspecified(host)):
        if not policy.udp_listen:
            raise ValueError(f"feed url {shown!r} listens on a udp port of this node; only a service with "
                             "feed_udp_listen = true takes such feeds")
        return
    if not host:
        raise ValueError(f"feed url {shown!r} names no host")
    checked_addresses(scheme, host, port, policy, shown)


def checked_addresses(scheme: str, host: str, port: int | None, policy: HostPolicy,
                      shown: str | None = None) -> list[Address]:
    """The addresses `host` resolves to, once every one of them passed `policy` (connect to these, not to a
    second lookup of the name); ValueError saying why not, UnresolvedHost when the name does not resolve."""
    shown = shown or f"{scheme}://{host}:{port}"
    allowed = [check_allow_entry(a) for a in policy.allow]
    name_allowed = host.rstrip(".").lower() in allowed
    networks = [ipaddress.ip_network(a) for a in allowed if "/" in a]
    addresses = resolve(host, port)
    for address in addresses:
        kind = local_kind(address)
        if kind and not name_allowed and not any(address in n for n in networks if n.version == address.version):
            where = f"{host!r}" if host == str(address) else f"{host!r} resolves to {address}, which"
            raise ValueError(f"feed host {where} is {kind}; feeds may not read from there unless "
                             "feed_allow_hosts names the host or its network")
        if port is not None:
            for service in policy.services:
                if service.port == port and _is_service_host(address, service.host):
                    raise ValueError(f"feed url {shown!r} points at port {port} of this service's own "
                                     f"{service.name}; a feed never reads it")
    return addresses


def resolve(host: str, port: int | None = None) -> list[Address]:
    """Every address `host` resolves to (an address literal is itself); UnresolvedHost when there is none."""
    try:
        return [_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise UnresolvedHost(f"feed host {host!r} does not resolve ({e})") from None
    found = list(dict.fromkeys(_address(info[4][0]) for info in infos))
    if not found:
        raise UnresolvedHost(f"feed host {host!r} does not resolve")
    return found


def local_kind(address: Address) -> str | None:
    """What makes `address` this node's own or its link's: "a loopback address", "a link-local address (cloud
    metadata services live there)", "a cloud metadata service", "an unspecified address (this node)"; None for
    every other address."""
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address in METADATA:
        return "a cloud metadata service"
    if address.is_unspecified or (address.version == 4 and address in _THIS_HOST):
        return "an unspecified address (this node)"
    return None


def _address(text: str) -> Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])        # fe80::1%eth0: the zone names no other host
    if address.version == 6 and address.ipv4_mapped is not None:     # ::ffff:127.0.0.1 is 127.0.0.1
        return address.ipv4_mapped
    return address


def _is_unspecified(host: str) -> bool:
    try:
        return _address(host).is_unspecified
    except ValueError:
        return False


def _is_service_host(address: Address, service_host: str) -> bool:
    """Whether `address` reaches the host a service listens on: this node (loopback, unspecified or one of its own
    addresses) for a service of this node, or one of the service host's addresses."""
    if local_kind(address) is not None or is_own_address(address):
        return True
    if not service_host or _is_unspecified(service_host):
        return False
    try:
        return address in resolve(service_host)
    except UnresolvedHost:
        return False


def is_own_address(address: Address) -> bool:
    """Whether `address` belongs to one of this node's interfaces: only those can be bound (port 0: nothing is
    taken, nothing listens)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(address), 0))
        return True
    except OSError:
        return False


__all__ = ["HostPolicy", "Service", "UnresolvedHost", "check_allow_entry", "check_host", "checked_addresses",
           "is_own_address",
           "local_kind", "resolve"]
