"""Where a feed may point (pipeline/video/hosts.py): not at this node, its link, or the service's own ports."""
from __future__ import annotations

import pytest

from pipeline.feeds import host_policy
from pipeline.settings import load_settings
from pipeline.video.hosts import HostPolicy, Service, UnresolvedHost, check_allow_entry, check_host

STRICT = HostPolicy()


@pytest.mark.parametrize("url,words", [
    ("rtsp://127.0.0.1:554/cam", "'127.0.0.1' is a loopback address"),
    ("rtsp://127.5.6.7/cam", "loopback"),
    ("http://[::1]:8000/x", "'::1' is a loopback address"),
    ("rtsp://[::ffff:127.0.0.1]/cam", "loopback"),                  # an IPv4-mapped IPv6 address is the IPv4 one
    ("rtsp://127.1/cam", "'127.1' resolves to 127.0.0.1, which is a loopback address"),
    ("rtsp://2130706433/cam", "resolves to 127.0.0.1"),              # 127.0.0.1 written as one number
    ("rtsp://localhost:8554/cam", "'localhost' resolves to 127.0.0.1, which is a loopback address"),
    ("rtsp://LOCALHOST./cam", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local address (cloud metadata services live there)"),
    ("http://169.254.10.20/x", "link-local"),
    ("rtsp://[fe80::1%25eth0]/cam", "link-local"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "a cloud metadata service"),
    ("http://100.100.100.200/latest/meta-data/", "a cloud metadata service"),
    ("rtsp://0.0.0.0:554/cam", "an unspecified address (this node)"),
    ("rtsp://0.1.2.3/cam", "unspecified"),
    ("https://[::]/x.m3u8", "unspecified"),
    ("srt://127.0.0.1:9000", "loopback"),
    ("udp://127.0.0.1:5600", "loopback"),
])
def test_this_node_and_its_link_are_refused(url, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")) as e:
        check_host(url, STRICT)
    assert "feed_allow_hosts" in str(e.value)


def test_lan_and_other_hosts_pass():
    for url in ("rtsp://admin:pw@10.0.0.5:554/stream1", "rtsp://172.16.3.4/cam", "http://192.168.1.10/live.m3u8",
                "https://203.0.113.7/x.m3u8", "udp://239.1.1.1:5000", "rtsp://[2001:db8::7]/cam",
                "rtsp://172.31.255.1/cam", "/tmp/a.mp4", "file:///tmp/a.mp4"):
        check_host(url, STRICT)


def test_a_name_that_does_not_resolve_says_so():
    with pytest.raises(UnresolvedHost, match="'no-such-camera.invalid' does not resolve"):
        check_host("rtsp://no-such-camera.invalid/cam", STRICT)


def test_the_allow_list_takes_names_addresses_and_networks():
    loopback4 = HostPolicy(allow=("127.0.0.0/8",))
    check_host("rtsp://127.0.0.1:8554/cam", loopback4)
    check_host("rtsp://127.9.9.9/cam", loopback4)
    check_host("rtsp://localhost:8554/cam", loopback4)               # every address it resolves to is allowed
    with pytest.raises(ValueError, match="loopback"):
        check_host("rtsp://[::1]/cam", loopback4)
    with pytest.raises(ValueError, match="link-local"):
        check_host("http://169.254.169.254/", loopback4)
    one = HostPolicy(allow=("127.0.0.1",))
    check_host("rtsp://127.0.0.1/cam", one)
    with pytest.raises(ValueError, match="loopback"):
        check_host("rtsp://127.0.0.2/cam", one)
    check_host("rtsp://localhost/cam", HostPolicy(allow=("LocalHost.",)))      # a name, as written or not
    check_host("rtsp://[::1]/cam", HostPolicy(allow=("::1",)))
    check_host("http://169.254.7.7/x", HostPolicy(allow=("169.254.7.0/24",)))
    assert check_allow_entry(" 10.1.2.3 ") == "10.1.2.3/32" and check_allow_entry("10.1.2.3/8") == "10.0.0.0/8"
    assert check_allow_entry("Cam-1.Local.") == "cam-1.local" and check_allow_entry("::1") == "::1/128"
    for bad in ("", " ", "a b", "http://h", "h/x", "-" * 64 + ".x", "caméra"):
        with pytest.raises(ValueError, match="host name, an address or a CIDR"):
            check_allow_entry(bad)


def test_the_services_own_ports_are_refused_even_where_loopback_is_allowed():
    policy = HostPolicy(allow=("127.0.0.0/8", "::1", "localhost"),
                        services=(Service("Redis", "127.0.0.1", 6379), Service("API", "127.0.0.1", 80),
                                  Service("Ray", "", 8080), Service("Redis", "10.0.0.9", 6380)))
    for url in ("rtsp://127.0.0.1:6379/x", "rtsp://localhost:6379/x", "rtsp://[::1]:6379/x",
                "http://127.0.0.1/x",                               # http's default port is the API's here
                "http://127.0.0.1:8080/metrics",                     # a port of this node, whatever its address
                "rtsp://0.0.0.0:6379/x", "rtsp://10.0.0.9:6380/x"):  # another host's service
        check = HostPolicy(allow=policy.allow + ("0.0.0.0/8",), services=policy.services)
        with pytest.raises(ValueError, match="this service's own (Redis|API|Ray)"):
            check_host(url, check)
    check_host("rtsp://127.0.0.1:8554/cam", policy)                  # other ports of an allowed host: fine
    check_host("rtsp://10.0.0.9:554/cam", policy)                    # the Redis host's other ports
    check_host("http://10.0.0.8:8080/cam", policy)                   # another host on a service's port number
    check_host("rtsp://10.0.0.7:6380/cam", policy)


@pytest.mark.parametrize("url", ["udp://:5600", "udp://@:5600", "udp://0.0.0.0:5600", "udp://[::]:5600",
                                 "udp://:5600?fifo_size=10"])
def test_udp_listen_forms_need_their_setting(url):
    with pytest.raises(ValueError, match="listens on a udp port of this node.*feed_udp_listen"):
        check_host(url, STRICT)
    check_host(url, HostPolicy(udp_listen=True))


def test_the_policy_from_the_settings(tmp_path):
    settings = load_settings(data_dir=tmp_path, redis_url="redis://:secret@10.0.0.9:6390/0", port=8100,
                             metrics_export_port=8081, feed_allow_hosts=["127.0.0.1", "cam.local"],
                             feed_udp_listen=True)
    policy = host_policy(settings)
    assert policy.allow == ("127.0.0.1/32", "cam.local") and policy.udp_listen
    assert {Service("API", "127.0.0.1", 8100), Service("Redis", "10.0.0.9", 6390),
            Service("Ray metrics export", "", 8081)} <= set(policy.services)
    defaults = host_policy(load_settings(data_dir=tmp_path))
    assert defaults.allow == () and not defaults.udp_listen
    with pytest.raises(ValueError, match="feed_allow_hosts"):
        load_settings(data_dir=tmp_path, feed_allow_hosts=["not a host"])
