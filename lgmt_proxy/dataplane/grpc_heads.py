"""A call's header block read as h2 would read it: decoded by the
connection's own HPACK decoder (h2's, so that its dynamic table stays the
one h2 would keep), checked as h2 checks a request's header list
(`rules.h2check`, compiled: h2's checks were a twentieth of a call), and its
``content-length`` taken; a failure is the connection error h2 would give,
but COMPRESSION_ERROR for a block that does not decode (RFC 9113, 4.3).

Most clients send the same block for every call once their headers are in
the dynamic table, and decoding it (Huffman in Python) and checking it was
most of a call's CPU: a block that leaves the table as it found it is kept,
with what it decoded to, and is not decoded again while the table is
unchanged (`HeadReader.request`).
"""

from __future__ import annotations

from typing import Any, Final

from hpack import Decoder, HPACKError, OversizedHeaderListError

from lgmt_proxy.rules import h2check
from lgmt_proxy.rules.headers import RawHeaders

_PROTOCOL_ERROR: Final = 1
_COMPRESSION_ERROR: Final = 9
_ENHANCE_YOUR_CALM: Final = 11
#: Blocks kept per connection, and the largest kept.
_CACHED: Final = 8
_CACHED_SIZE: Final = 2048


class HeadReader:
    """The header blocks of one connection's calls, read against its HPACK
    decoder. A kept block is reused only while the decoder's dynamic table
    is the one it was decoded against: the same newest entry (held here, so
    its identity cannot be reused), the same number of entries and the same
    size limit. Entries are only ever added at the front, so those three
    change whenever the table does."""

    __slots__ = ("_cache", "_decoder")

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        #: block -> (newest entry, entries, size limit, headers, content-length)
        self._cache: dict[bytes, tuple[Any, int, int, RawHeaders, int | None]] = {}

    def request(self, block: bytes) -> tuple[RawHeaders, int | None] | int:
        """A request's headers and ``content-length``, or the connection
        error its block is."""
        table = self._decoder.header_table
        # Any: compiled, a typed tuple would be unboxed and boxed anew (no identity).
        entries: Any = table.dynamic_entries
        newest: object = entries[0] if entries else None
        count = len(entries)
        maxsize = table.maxsize
        kept = self._cache.get(block)
        if kept is not None and kept[0] is newest and kept[1] == count and kept[2] == maxsize:
            return kept[3], kept[4]
        headers = self._decode(block)
        if isinstance(headers, int):
            return headers
        if h2check.request_problem(headers) is not None:  # content-length's too
            return _PROTOCOL_ERROR
        length = h2check.content_length(headers)
        after: Any = table.dynamic_entries
        if (
            len(block) <= _CACHED_SIZE
            and block[:1]
            and block[0] & 0xE0 != 0x20  # a table size update is never reused
            and len(after) == count
            and (after[0] if after else None) is newest
            and table.maxsize == maxsize
        ):
            if len(self._cache) >= _CACHED:
                self._cache.clear()
            self._cache[block] = (newest, count, maxsize, headers, length)
        return headers, length

    def trailers(self, block: bytes) -> int:
        """0, or the connection error a request's trailers block is (it is
        decoded whatever becomes of its stream: the table must move)."""
        headers = self._decode(block)
        if isinstance(headers, int):
            return headers
        return _PROTOCOL_ERROR if h2check.trailers_problem(headers) is not None else 0

    def skip(self, block: bytes) -> int:
        """0, or the connection error decoding a block is: one on a stream
        that is closed is decoded all the same (the table must move)."""
        headers = self._decode(block)
        return headers if isinstance(headers, int) else 0

    def _decode(self, block: bytes) -> RawHeaders | int:
        try:
            return list(self._decoder.decode(block, raw=True))  # type: ignore[arg-type]
        except OversizedHeaderListError:  # an HPACK bomb, as h2 answers it
            return _ENHANCE_YOUR_CALM
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError):
            return _COMPRESSION_ERROR  # RFC 9113, 4.3 (h2 said PROTOCOL_ERROR)
