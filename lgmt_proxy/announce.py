"""The start-up lines about upstreams: what each signal or route is wired to,
which get compressed pushes, which are off. Kept apart from the service so
the wording users match in log queries lives in one small place."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from twisted.logger import Logger

from lgmt_proxy.config.settings import SIGNALS, UpstreamConfig
from lgmt_proxy.dataplane.upstream import Upstream


def upstream_fields(
    upstream: UpstreamConfig, *, has_token: bool, from_consumer: bool, via: str = "direct"
) -> dict[str, str]:
    """The start-up line's fields for one upstream, as users read them: ``-``
    where nothing is sent (no Basic user on a bearer or none route, no
    ``X-Scope-OrgID``), ``from_consumer`` where each consumer's own is;
    ``via`` is the forward proxy's URL without its credentials, or direct."""
    auth = upstream.auth if has_token else "none"
    return {
        "url": upstream.url,
        "via": via,
        "auth": auth,
        "org_id": upstream.user if auth == "basic" and upstream.user else "-",
        "tenant_id": "from_consumer" if from_consumer else upstream.tenant or "-",
    }


def log_upstreams(
    log: Logger,
    upstreams: Mapping[str, Upstream],
    *,
    from_consumer: Collection[str],
    routes_file: bool,
) -> None:
    """One line per upstream, one naming those whose uncompressed pushes are
    gzip'd, and (built-in routes) one naming the signals that are off."""
    for name, up in upstreams.items():
        # The event's field names (signal, org_id, tenant_id) are what log
        # queries match, so they stay; with ROUTES_FILE they hold the
        # route's upstream name and Basic-auth user.
        log.info(
            "signal {signal} on: {url} via {via} (auth {auth}, org id {org_id}, "
            "tenant {tenant_id})",
            signal=name,
            **upstream_fields(
                up.config,
                has_token=up.token is not None,
                from_consumer=name in from_consumer,
                via=up.proxy.display if up.proxy is not None else "direct",
            ),
        )
    if gzipped := [n for n, up in upstreams.items() if up.config.gzip_level]:
        log.info("uncompressed pushes gzip'd on the way to: {names}", names=", ".join(gzipped))
    off = [n for n in SIGNALS if n not in upstreams]
    if off and not routes_file:
        log.info("signals off (their routes answer 404): {off}", off=", ".join(off))
