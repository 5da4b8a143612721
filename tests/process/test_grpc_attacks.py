"""HTTP/2's known attacks against a real ``twistd`` process's OTLP/gRPC
listener, driven with the `h2` library: rapid reset (CVE-2023-44487), a
CONTINUATION flood (CVE-2024-27316), an HPACK header list over the limit,
PING and SETTINGS floods, windows that never open. Each ends in a GOAWAY or
is held within its bounds; afterwards the proxy still serves a normal call,
and its RSS is within 16 MiB of where it was before the attacks."""

from __future__ import annotations

from typing import Any

from hyperframe.frame import ContinuationFrame, HeadersFrame
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.grpc_streams import MAX_RESETS
from lgmt_proxy.rules import grpc
from tests.loopback.test_grpc import H2Client, h2_connect
from tests.support.helpers import Recorder, env_for, free_port, listen, sleep, spawn_proxy
from tests.support.helpers import upstream_site as site

MiB = 1024 * 1024
CONNECTIONS = 10


class GrpcAttackTests(TestCase):
    timeout = 120

    async def _proxy(self) -> tuple[Any, int]:
        up = Recorder()
        up.headers = [(b"Content-Type", b"application/x-protobuf")]
        up.body = b""
        port = listen(site(up))
        self.addCleanup(port.stopListening)
        grpc_port = free_port()
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            OTLP_GRPC_LISTEN=f"tcp:{grpc_port}:interface=127.0.0.1",
            SHUTDOWN_DELAY_SECONDS="0",
            SHUTDOWN_GRACE_SECONDS="1",
            LOG_LEVEL="warn",
        )
        proc = await spawn_proxy(env)
        self.addCleanup(lambda: proc.ended)
        self.addCleanup(proc.signal, "KILL")
        return proc, grpc_port

    async def _served(self, port: int) -> None:
        client = await h2_connect(port)
        call = await client.unary(b"\x0a\x00")
        self.assertEqual(call.status, 0, call)
        client.transport.loseConnection()  # type: ignore[union-attr]

    async def _goaway(self, client: H2Client, code: int) -> None:
        await client.closed
        assert client.goaway is not None
        self.assertEqual(client.goaway.error_code, code)

    async def test_attacks_leave_it_serving_within_16_mib(self) -> None:
        proc, port = await self._proxy()
        for _ in range(20):
            await self._served(port)
        before = proc.vm("VmRSS")

        # Rapid reset: streams opened and cancelled at once, without end.
        clients = [await h2_connect(port) for _ in range(CONNECTIONS)]
        for client in clients:
            for _ in range(MAX_RESETS * 3):
                if client.goaway is not None:
                    break
                sid = client.start()
                client.h2.reset_stream(sid, error_code=8)
                client.flush()
        for client in clients:
            await self._goaway(client, 11)

        # PING and SETTINGS floods.
        clients = [await h2_connect(port) for _ in range(CONNECTIONS)]
        for i, client in enumerate(clients):
            for n in range(3000):
                if i % 2:
                    client.h2.ping(n.to_bytes(8, "big"))
                else:
                    client.h2.update_settings({4: 65535 + n})  # INITIAL_WINDOW_SIZE
            client.flush()
        for client in clients:
            await self._goaway(client, 11)

        # CONTINUATION flood: a header block that never ends.
        clients = [await h2_connect(port) for _ in range(CONNECTIONS)]
        for client in clients:
            await client.settings
            assert client.transport is not None
            client.transport.write(HeadersFrame(1, data=b"").serialize())
            for _ in range(200):
                client.transport.write(ContinuationFrame(1, data=b"\x00" * 100).serialize())
        for client in clients:
            await client.closed
            self.assertIsNotNone(client.goaway)

        # Header lists over 16 KiB (what an HPACK bomb decodes to).
        clients = [await h2_connect(port) for _ in range(CONNECTIONS)]
        for client in clients:
            await client.settings
            client.h2.remote_settings.max_header_list_size = 2**24
            client.h2.remote_settings.acknowledge()
            client.start(extra=[(b"x-bomb-%d" % i, b"a" * 4000) for i in range(64)])
        for client in clients:
            await client.closed
            self.assertIsNotNone(client.goaway)

        # Windows that never open: every call answered, no answer ever sent.
        holders = [await h2_connect(port, window=0) for _ in range(CONNECTIONS)]
        for client in holders:
            await client.settings
            for _ in range(100):
                sid = client.start()
                client.send(sid, grpc.frame_message(b"\x0a\x00"), end=True)
        await sleep(1.0)
        for client in holders:
            self.assertFalse(client.closed.called)

        await self._served(port)
        after = proc.vm("VmRSS")
        self.assertLess(after - before, 16 * MiB, (before, after))
        for client in holders:
            client.transport.loseConnection()  # type: ignore[union-attr]
