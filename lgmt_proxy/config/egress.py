"""Egress through an HTTP forward proxy: ``HTTPS_PROXY``, ``HTTP_PROXY`` and
``NO_PROXY`` as curl and Go read them, parsed by pure functions.

Many clusters reach the internet only through a forward proxy (Squid, a
cloud egress proxy) named in these variables for every workload; ignoring
them turns every request into a connect timeout. The upstream's host name is
resolved by the proxy (``CONNECT host:port``), never by us.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

import attrs

from lgmt_proxy.config.secret import Secret

#: Each scheme's variables, the upper-case name first (curl reads
#: ``http_proxy`` in lower case only; Go and most tools read both).
PROXY_VARIABLES = {
    "https": ("HTTPS_PROXY", "https_proxy"),
    "http": ("HTTP_PROXY", "http_proxy"),
}
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
#: A ROUTES_FILE route's ``proxy: none``: direct, whatever the environment says.
DIRECT: Final = "none"


@attrs.frozen
class ForwardProxy:
    """A forward proxy: where it is and the ``Proxy-Authorization`` value (a
    `Secret`: never logged). ``display`` is the URL without credentials."""

    scheme: str
    host: str
    port: int
    authorization: Secret | None = attrs.field(default=None, eq=False)

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_proxy_url(text: str, credentials: str | None = None) -> ForwardProxy | str:
    """A proxy URL (``http://[user:password@]host[:port]``, ``https://`` for
    TLS to the proxy itself; a bare ``host:port`` is taken as ``http://``, as
    curl does), or the problem with it (never quoting the credentials).
    ``credentials`` (``user:password``, from a file) win over the URL's."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return "not a URL like http://proxy.example:3128"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be only a scheme, host and port"
    if credentials is None and parts.username is not None:
        credentials = unquote(parts.username) + ":" + unquote(parts.password or "")
    authorization = None
    if credentials is not None:
        found = proxy_authorization(credentials)
        if isinstance(found, str):
            return found
        authorization = found
    return ForwardProxy(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or (443 if parts.scheme == "https" else 80),
        authorization=authorization,
    )


#: A route's own proxy (its ``proxy:``): a proxy, `DIRECT`, or None for the
#: environment's rule.
RouteProxy = ForwardProxy | Literal["none"] | None


@attrs.frozen
class _Rule:
    """One ``NO_PROXY`` entry: a domain (with its subdomains), an address or
    a network, and an optional port."""

    domain: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, address: object, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        domain = self.domain
        assert domain is not None
        return host == domain or host.endswith("." + domain)


@attrs.frozen
class NoProxy:
    """The hosts reached directly. ``*`` alone means every host."""

    rules: tuple[_Rule, ...] = ()
    everything: bool = False

    def bypasses(self, host: str, port: int) -> bool:
        """Reached directly: listed, or loopback (as Go's proxy rules say:
        a proxy elsewhere cannot reach our own loopback)."""
        if self.everything:
            return True
        host = host.lower().rstrip(".").strip("[]")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                host
            )
        except ValueError:
            address = None
        if host == "localhost" or (address is not None and address.is_loopback):
            return True
        return any(rule.matches(host, address, port) for rule in self.rules)


def parse_no_proxy(text: str) -> NoProxy:
    """``NO_PROXY`` as curl documents it: comma-separated host names (each
    with its subdomains; a leading ``.`` or ``*.`` changes nothing), IP
    addresses and CIDR ranges, each with an optional ``:port``, or ``*``.
    Entries that are none of these are ignored, as curl ignores them."""
    rules: list[_Rule] = []
    for raw in text.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return NoProxy(everything=True)
        port: int | None = None
        if entry.startswith("["):  # [v6]:port
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
        elif entry.count(":") == 1:
            entry, _, digits = entry.partition(":")
            if not digits.isdigit():
                continue
            port = int(digits)
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            domain = entry.removeprefix("*").lstrip(".").rstrip(".")
            if domain and "/" not in domain:
                rules.append(_Rule(domain=domain, port=port))
            continue
        rules.append(_Rule(network=network, port=port))
    return NoProxy(rules=tuple(rules))


@attrs.frozen
class Egress:
    """How upstreams are reached: the forward proxy of each upstream scheme
    (``https``, ``http``), the hosts that bypass it, and the file holding
    the proxies' credentials (read by ``tap.py``, applied by `with_credentials`;
    ``authorization`` is what it holds, for routes' own proxies)."""

    proxies: Mapping[str, ForwardProxy] = attrs.field(factory=dict)
    no_proxy: NoProxy = attrs.field(factory=NoProxy)
    credentials_file: str | None = None
    authorization: Secret | None = attrs.field(default=None, eq=False)

    def proxy_for(
        self, scheme: str, host: str, port: int, own: RouteProxy = None
    ) -> ForwardProxy | None:
        """The proxy an upstream is reached through, or None: direct.

        ``own`` is a ROUTES_FILE route's choice, which wins over the
        environment and NO_PROXY: `DIRECT`, or its proxy (with the
        credentials file's credentials when its URL has none)."""
        if own == DIRECT:
            return None
        if isinstance(own, ForwardProxy):
            if own.authorization is None and self.authorization is not None:
                return attrs.evolve(own, authorization=self.authorization)
            return own
        proxy = self.proxies.get(scheme)
        if proxy is None or self.no_proxy.bypasses(host, port):
            return None
        return proxy

    def with_credentials(self, credentials: str) -> Egress | str:
        """Every proxy with ``credentials`` (``user:password``, from the
        credentials file) in place of its URL's, or the problem with them."""
        authorization = proxy_authorization(credentials)
        if isinstance(authorization, str):
            return authorization
        proxies = {s: attrs.evolve(p, authorization=authorization) for s, p in self.proxies.items()}
        return attrs.evolve(self, proxies=proxies, authorization=authorization)


def proxy_authorization(credentials: str) -> Secret | str:
    """``Proxy-Authorization: Basic`` for ``user:password``, or the problem."""
    credentials = credentials.strip()
    if ":" not in credentials or credentials.startswith(":"):
        return "credentials must be user:password"
    return Secret(value="Basic " + base64.b64encode(credentials.encode()).decode("ascii"))


def parse_egress(
    environ: Mapping[str, str], credentials_file: str | None = None
) -> tuple[Egress, list[str]]:
    """The `Egress` the environment asks for, and one problem line per
    variable that is set but unusable (never quoting a credential)."""
    proxies: dict[str, ForwardProxy] = {}
    problems: list[str] = []
    for scheme, names in PROXY_VARIABLES.items():
        for name in names:
            value = environ.get(name, "").strip()
            if not value:
                continue
            parsed = parse_proxy_url(value)
            if isinstance(parsed, str):
                problems.append(f"{name}: {parsed}")
            else:
                proxies[scheme] = parsed
            break
    no_proxy = ""
    for name in NO_PROXY_VARIABLES:
        if value := environ.get(name, "").strip():
            no_proxy = value
            break
    egress = Egress(
        proxies=proxies, no_proxy=parse_no_proxy(no_proxy), credentials_file=credentials_file
    )
    return egress, problems
