"""The recorder: metrics always, an access line only when the level shows it."""

from __future__ import annotations

import io

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.request import Incoming
from lgmt_proxy.obs.logs import StreamObserver, event_as_json
from lgmt_proxy.obs.metrics import ProxyMetrics
from lgmt_proxy.obs.record import Recorder


def _request() -> Incoming:
    req = Incoming(0.0)
    req.method = b"GET"
    req.path = b"/loki/x"
    req.upstream_name = "loki"
    req.status = 200
    req.counted = True
    return req


class RecorderTests(TestCase):
    def test_access_line_only_when_the_level_shows_it(self) -> None:
        for access_log, lines in ((True, 1), (False, 0)):
            registry = CollectorRegistry()
            stream = io.StringIO()
            recorder = Recorder(
                ProxyMetrics(registry, process_collectors=False),
                Clock(),
                StreamObserver(stream, event_as_json),
                access_log=access_log,
            )
            recorder.finished(_request(), "10.0.0.1")
            recorder.refused(400, "10.0.0.1", "malformed")
            self.assertEqual(len(stream.getvalue().splitlines()), 2 * lines, access_log)
            counted = registry.get_sample_value(
                "proxy_requests_total", {"upstream": "loki", "method": "GET", "status": "200"}
            )
            self.assertEqual(counted, 1.0, "counted whatever the level")
