"""The OTLP/gRPC listener's settings (``OTLP_GRPC_LISTEN``,
``OTLP_GRPC_TLS_CERT_FILE``, ``OTLP_GRPC_TLS_KEY_FILE``), parsed from a plain
mapping: pure, one problem line per bad variable, as `parse_config` reports
them. The TLS files themselves are read by the caller (``tap.load``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

#: Every variable read here (settings.KNOWN_VARIABLES includes them).
VARIABLES = ("OTLP_GRPC_LISTEN", "OTLP_GRPC_TLS_CERT_FILE", "OTLP_GRPC_TLS_KEY_FILE")

#: An endpoint description: a plugin name, a colon, its arguments (tcp:4317,
#: tcp:port=4317:interface=127.0.0.1, unix:/run/grpc.sock).
ENDPOINT = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*:\S+")


@attrs.frozen
class GrpcListen:
    """Where the gRPC listener listens (None: off) and its TLS files."""

    listen: str | None = None
    tls_files: tuple[str, str] | None = None


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or not value.strip() else value.strip()


def parse_grpc_listen(
    env: Mapping[str, str], *, has_otlp: bool, routes_file: bool
) -> tuple[GrpcListen, list[str]]:
    """OTLP_GRPC_LISTEN: unset, empty or ``off``: no gRPC listener; a port
    (1 to 65535); or an endpoint description as ``--listen`` takes. It
    bridges to the otlp route, so with the built-in routes the otlp signal
    must be on. Then the TLS files: both or neither, only with the listener."""
    problems: list[str] = []
    listen = _listen(env, problems, has_otlp=has_otlp, routes_file=routes_file)
    return GrpcListen(listen, _tls_files(env, problems, listen)), problems


def _listen(
    env: Mapping[str, str], problems: list[str], *, has_otlp: bool, routes_file: bool
) -> str | None:
    value = _get(env, "OTLP_GRPC_LISTEN")
    if value is None or value.lower() == "off":
        return None
    if value.isascii() and value.isdigit():
        if not 1 <= int(value) <= 65535:
            problems.append(f"OTLP_GRPC_LISTEN: a port must be 1 to 65535, got {value!r}")
            return None
        main = _get(env, "PORT") or "8085"
        if main.isascii() and main.isdigit() and int(main) == int(value):
            problems.append("OTLP_GRPC_LISTEN: must not be the main listener's PORT")
            return None
    elif not ENDPOINT.fullmatch(value):
        problems.append(
            "OTLP_GRPC_LISTEN: expected a port (4317) or an endpoint description "
            "(tcp:4317, tcp:port=4317:interface=127.0.0.1)"
        )
        return None
    if not routes_file and not has_otlp:
        problems.append(
            "OTLP_GRPC_LISTEN: OTLP over gRPC is bridged to the otlp signal; "
            "set GRAFANA_CLOUD_OTLP_URL and GRAFANA_CLOUD_OTLP_ORG_ID"
        )
        return None
    return value


def _tls_files(
    env: Mapping[str, str], problems: list[str], listen: str | None
) -> tuple[str, str] | None:
    cert = _get(env, "OTLP_GRPC_TLS_CERT_FILE")
    key = _get(env, "OTLP_GRPC_TLS_KEY_FILE")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "OTLP_GRPC_TLS_CERT_FILE" if cert is None else "OTLP_GRPC_TLS_KEY_FILE"
        problems.append(f"{missing}: required for TLS on the gRPC listener (set both or neither)")
        return None
    if listen is None:
        if (_get(env, "OTLP_GRPC_LISTEN") or "off").lower() == "off":
            # else OTLP_GRPC_LISTEN's own problem is reported
            problems.append(
                "OTLP_GRPC_TLS_CERT_FILE: set, but the gRPC listener is off (OTLP_GRPC_LISTEN)"
            )
        return None
    return cert, key
