"""A call's header block read past h2 (`dataplane.grpc_heads.HeadReader`)
against h2's own reading: the same headers from the same HPACK table, the
same connection errors, and a kept block never reused once the table moved.
"""

from __future__ import annotations

from h2.utilities import HeaderValidationFlags, validate_headers
from hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from lgmt_proxy.dataplane.grpc_heads import HeadReader

_BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"),
    (b":authority", b"lgmt-proxy:4317"),
    (b"content-type", b"application/grpc"),
]


_REQUEST = HeaderValidationFlags(False, False, False, False)


def _reference(decoder: Decoder, block: bytes) -> list[tuple[bytes, bytes]] | None:
    """What h2 makes of ``block``: its headers, or None (refused)."""
    try:
        headers = [tuple(h) for h in decoder.decode(block, raw=True)]
    except Exception:
        return None
    try:
        list(validate_headers(headers, _REQUEST))  # type: ignore[arg-type]
    except Exception:
        return None
    return headers  # type: ignore[return-value]


class HeadReaderTests(TestCase):
    def test_the_same_block_again_is_the_same_call(self) -> None:
        """A client's repeated headers: once indexed, every later block is
        the same bytes, read once and then kept."""
        encoder, reader = Encoder(), HeadReader(Decoder())
        first = encoder.encode(_BASE)
        again = encoder.encode(_BASE)
        self.assertNotEqual(first, again)  # the first one added to the table
        for block in (first, again, again, again):
            head = reader.request(block)
            assert not isinstance(head, int)
            self.assertEqual([tuple(h) for h in head[0]], _BASE)
            self.assertIsNone(head[1])

    def test_a_kept_block_follows_the_table(self) -> None:
        """The same bytes mean other headers once the table moved: a block
        referring to the newest entry, sent again after a new entry, is the
        new entry's."""
        encoder = Encoder()
        reader, reference = HeadReader(Decoder()), Decoder()
        blocks = [
            encoder.encode([*_BASE, (b"x-k", b"one")]),
            encoder.encode([*_BASE, (b"x-k", b"one")]),  # all indexed: kept
            encoder.encode([*_BASE, (b"x-k", b"two")]),  # a new entry in front
        ]
        for block in [*blocks, blocks[1], blocks[1], blocks[2]]:
            expected = _reference(reference, block)
            head = reader.request(block)
            if expected is None:
                self.assertIsInstance(head, int)
                return
            assert not isinstance(head, int)
            self.assertEqual([tuple(h) for h in head[0]], expected)
        # blocks[1] after "two" went in front reads "two" where it read "one".
        second = reader.request(blocks[1])
        assert not isinstance(second, int)
        self.assertIn((b"x-k", b"two"), [tuple(h) for h in second[0]])

    def test_a_table_size_update_is_never_kept(self) -> None:
        """A block beginning with a table size update empties the table
        each time it is read (to 0 and back): read each time."""
        encoder = Encoder()
        reader, reference = HeadReader(Decoder()), Decoder()
        for block in (encoder.encode(_BASE), encoder.encode(_BASE)):
            reader.request(block), _reference(reference, block)
        encoder.header_table_size = 0
        encoder.header_table_size = 4096
        resized = encoder.encode(_BASE)  # 0 then 4096, then literals (re-indexed)
        indexed = encoder.encode(_BASE)
        for block in (resized, indexed, resized, indexed):
            expected = _reference(reference, block)
            head = reader.request(block)
            assert expected is not None and not isinstance(head, int)
            self.assertEqual([tuple(h) for h in head[0]], expected)

    def test_errors_as_h2(self) -> None:
        """What h2 refuses, with h2's codes: a block that does not decode
        (COMPRESSION_ERROR, RFC 9113 4.3, where h2 says PROTOCOL_ERROR), a header list over the limit (ENHANCE_YOUR_CALM:
        an HPACK bomb), a list h2's checks refuse or a content-length that
        is not digits (PROTOCOL_ERROR)."""
        reader = HeadReader(Decoder())
        self.assertEqual(reader.request(b"\xff\xff\xff\xff\xff\xff"), 9)
        small = Decoder()
        small.max_header_list_size = 100
        big = Encoder().encode([*_BASE, (b"x-big", b"v" * 200)])
        self.assertEqual(HeadReader(small).request(big), 11)
        for bad in (
            [*_BASE, (b"X-Upper", b"v")],
            [*_BASE, (b"connection", b"close")],
            [*_BASE, (b"te", b"gzip")],
            [h for h in _BASE if h[0] != b":path"],
            [*_BASE, (b":path", b"/again")],
            [(b"x-first", b"v"), *_BASE],
            [*_BASE, (b"content-length", b"12a")],
        ):
            self.assertEqual(HeadReader(Decoder()).request(Encoder().encode(bad)), 1, bad)
        ok = HeadReader(Decoder()).request(Encoder().encode([*_BASE, (b"content-length", b"12")]))
        assert not isinstance(ok, int)
        self.assertEqual(ok[1], 12)
        # Trailers: no pseudo-header (h2's check).
        self.assertEqual(reader.trailers(Encoder().encode([(b"x-t", b"v")])), 0)
        self.assertEqual(reader.trailers(Encoder().encode([(b":path", b"/")])), 1)

    @settings(max_examples=60, deadline=None)
    @given(
        steps=st.lists(
            st.tuples(
                st.sampled_from([b"a", b"b", b"c" * 40]),
                st.booleans(),
                st.integers(min_value=-1, max_value=5),
            ),
            min_size=1,
            max_size=25,
        )
    )
    def test_any_sequence_reads_as_a_fresh_decoder(
        self, steps: list[tuple[bytes, bool, int]]
    ) -> None:
        """Blocks from a client's encoder (values indexed or not), table size
        changes, and earlier blocks sent again: every read is the reference
        decoder's, error for error."""
        encoder = Encoder()
        reader, reference = HeadReader(Decoder()), Decoder()
        sent: list[bytes] = []
        for value, sensitive, replay in steps:
            if 0 <= replay < len(sent):
                block = sent[replay]
            else:
                if replay == -1:
                    encoder.header_table_size = 256 if encoder.header_table_size == 4096 else 4096
                block = encoder.encode([*_BASE, (b"x-v", value, sensitive)])
                sent.append(block)
            expected = _reference(reference, block)
            head = reader.request(block)
            if expected is None:
                self.assertIsInstance(head, int)
                return  # the connection would be closed
            assert not isinstance(head, int)
            self.assertEqual([tuple(h) for h in head[0]], expected)
