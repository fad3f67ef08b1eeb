"""Which ``Host`` and ``Origin`` headers a server without an API key answers.

A server without a key trusts whoever can connect, which on loopback means "programs on
this machine". Two browser tricks stretch that to any web page the user opens:

* **DNS rebinding.** A page at ``http://evil.example:8000`` makes ``evil.example`` resolve
  to 127.0.0.1; its scripts then talk to the local server as same-origin requests and can
  read the answers. The browser still sends ``Host: evil.example:8000``, so answering only
  requests whose Host names a loopback address (or the bound address, or a name the user
  allowed) closes this.
* **Cross-site POSTs.** A page anywhere may POST to ``http://127.0.0.1:8000/v1/...``
  directly: the Host is then loopback and passes, and a body sent as ``text/plain`` needs no
  CORS preflight, so the server would generate (the page cannot read the answer, but it can
  keep the model busy). Browsers name the page's origin in ``Origin`` on such a POST, so a
  POST whose Origin is neither this server's own origin nor an allowed name is refused too.
  Non-browser clients (curl, SDKs) send no Origin and are not affected.

With an API key neither check is needed: the generation endpoints then require the key,
which a foreign page does not know and the browser never adds by itself (the chat page
keeps it in its own origin's sessionStorage, out of reach of another origin).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit


def split_host(value: str) -> tuple[str, str | None]:
    """``Host``-header form -> (lowercase name without brackets, port or None):
    ``"[::1]:8000"`` -> ``("::1", "8000")``, ``"LocalHost"`` -> ``("localhost", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None  # a bare name, or an unbracketed IPv6 address


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(name: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (a name as :func:`split_host` returns it)."""
    ip = _ip(name)
    return name == "localhost" if ip is None else ip.is_loopback


@dataclass(frozen=True)
class HostPolicy:
    """The names a keyless server answers to: loopback, the address it is bound to, and
    ``allowed`` (``--allowed-hosts``; ``"*"`` turns both checks off)."""

    bound: str = "127.0.0.1"
    allowed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, bound: str, allowed: str | None) -> "HostPolicy":
        """``allowed``: the ``--allowed-hosts`` text, comma-separated names (ports ignored)."""
        names = tuple(n for n in (split_host(p)[0] for p in (allowed or "").split(",")) if n)
        return cls(bound=bound, allowed=names)

    @property
    def open(self) -> bool:
        return "*" in self.allowed

    def _named(self, name: str) -> bool:
        """``name`` is the bound address or an allowed name (IP addresses compared as
        addresses, so ``::1`` and ``0:0::1`` are one)."""
        ip = _ip(name)
        for known in (split_host(self.bound)[0],) + self.allowed:
            if known == name or (ip is not None and _ip(known) == ip):
                return True
        return False

    def host_allowed(self, host: str | None) -> bool:
        """A request's ``Host`` header. None (an HTTP/1.0 client without one) is allowed:
        browsers always send Host, and a rebinding attack needs a browser."""
        if host is None or self.open:
            return True
        name, _ = split_host(host)
        return is_loopback(name) or self._named(name)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """A POST's ``Origin`` header: absent (not a browser), this server's own origin (its
        host:port equals the request's Host, as for the chat page at ``/``), or an allowed
        name (a proxy that rewrites Host). A loopback origin on another port is another site
        (any local web app) and is refused; so is ``null`` (sandboxed frames, file://)."""
        if origin is None or self.open:
            return True
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        if host is not None and parts.netloc == host.strip().lower():
            return True
        return bool(self.allowed) and parts.hostname is not None and \
            parts.hostname in self.allowed

    def refusal(self, what: str, value: str) -> str:
        """The 403 message: what was refused and how to allow it."""
        name = split_host(value)[0] if what == "Host" else urlsplit(value).hostname
        how = (f"To allow this name, start the server with --allowed-hosts {name} "
               "(comma-separated; '*' allows any)" if name else
               "A page without an origin (a sandboxed frame, a file) is allowed only by "
               "--allowed-hosts '*'")
        return (f"{what} {value!r} is not allowed: without --api-key this server answers only "
                f"requests addressed to localhost, 127.0.0.1, [::1] or the address it listens "
                f"on ({self.bound}), and POSTs only from its own web page, so that other web "
                f"pages cannot use it (DNS rebinding, cross-site requests). {how}, or set "
                f"--api-key.")
