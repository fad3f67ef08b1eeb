"""Which Host and Origin headers a keyless server answers (chatft.serve.hosts)."""

from __future__ import annotations

import pytest

from chatft.serve.hosts import HostPolicy, is_loopback, split_host


@pytest.mark.parametrize("value, expected", [
    ("localhost:8000", ("localhost", "8000")),
    ("LocalHost", ("localhost", None)),
    ("127.0.0.1", ("127.0.0.1", None)),
    ("[::1]:8000", ("::1", "8000")),
    ("[::1]", ("::1", None)),
    ("::1", ("::1", None)),
    ("evil.example:80", ("evil.example", "80")),
])
def test_split_host(value, expected):
    assert split_host(value) == expected


def test_loopback_names():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.8.9.10", "::1"]))
    assert not any(map(is_loopback, ["localhost.evil.example", "10.0.0.1", "0.0.0.0",
                                     "evil.example", "128.0.0.1", ""]))


def test_default_policy_answers_loopback_only():
    p = HostPolicy()
    for host in ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.2",
                 None]:
        assert p.host_allowed(host), host
    for host in ["evil.example:8000", "evil.example", "localhost.evil.example:8000",
                 "10.0.0.1:8000", "[::2]:8000", "", "a:b:c"]:
        assert not p.host_allowed(host), host


def test_bound_address_and_allowed_names():
    p = HostPolicy.parse("192.168.1.5", "Chat.Example:443, 10.0.0.7,,[fe80::1]")
    assert p.allowed == ("chat.example", "10.0.0.7", "fe80::1")
    for host in ["192.168.1.5:8000", "chat.example", "CHAT.example:8443", "10.0.0.7:1",
                 "[fe80::1]:8000", "[FE80:0::1]", "localhost:8000"]:
        assert p.host_allowed(host), host
    for host in ["192.168.1.6:8000", "evil.example", "sub.chat.example"]:
        assert not p.host_allowed(host), host
    assert HostPolicy.parse("::", None).host_allowed("[0::0]:8000")  # addresses, not text
    star = HostPolicy.parse("127.0.0.1", "*")
    assert star.open and star.host_allowed("anything.example:1")


def test_origin_must_be_this_server_or_an_allowed_name():
    p = HostPolicy()
    assert p.origin_allowed(None, "127.0.0.1:8000")  # not a browser
    assert p.origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert p.origin_allowed("http://localhost:8000", "localhost:8000")
    assert p.origin_allowed("http://[::1]:8000", "[::1]:8000")
    # Another local web app (other port) or another site: refused.
    assert not p.origin_allowed("http://localhost:3000", "127.0.0.1:8000")
    assert not p.origin_allowed("http://127.0.0.1:3000", "127.0.0.1:8000")
    assert not p.origin_allowed("https://evil.example", "127.0.0.1:8000")
    assert not p.origin_allowed("null", "127.0.0.1:8000")
    assert not p.origin_allowed("http://127.0.0.1:8000", None)
    proxied = HostPolicy.parse("127.0.0.1", "chat.example")
    assert proxied.origin_allowed("https://chat.example", "127.0.0.1:8000")
    assert not proxied.origin_allowed("https://evil.example", "127.0.0.1:8000")
    assert HostPolicy.parse("127.0.0.1", "*").origin_allowed("https://evil.example", "x")


def test_refusal_says_how_to_allow():
    msg = HostPolicy().refusal("Host", "evil.example:8000")
    assert "--allowed-hosts evil.example " in msg and "--api-key" in msg
    msg = HostPolicy().refusal("Origin", "https://evil.example")
    assert "--allowed-hosts evil.example " in msg
    assert "--allowed-hosts '*'" in HostPolicy().refusal("Origin", "null")
