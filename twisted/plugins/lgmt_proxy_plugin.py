"""twistd plugin: ``twistd lgmt-proxy``. Imports nothing heavy: the service
module is loaded only when the command runs."""

from twisted.application.service import ServiceMaker

lgmt_proxy = ServiceMaker(
    "lgmt-proxy",
    "lgmt_proxy.tap",
    "Credential-injecting reverse proxy to a Grafana Cloud LGTM stack.",
    "lgmt-proxy",
)
