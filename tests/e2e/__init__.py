"""End-to-end tests: real third-party software on both sides of lgmt-proxy.

Prometheus (remote write in, PromQL out), the OpenTelemetry SDK's OTLP/HTTP
exporters, python-logging-loki and winston-loki push through a real
``twistd -n lgmt-proxy`` subprocess; every upstream verifies the injected
credentials. See docs/testing.md; peers come from scripts/install-e2e-peers.
"""
