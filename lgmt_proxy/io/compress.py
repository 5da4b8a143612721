"""A request body gzip'd as it streams upstream (``UPSTREAM_COMPRESSION``):
one zlib stream per request, fed chunk by chunk, its output framed as HTTP
chunks as soon as zlib gives any, the gzip trailer at the body's end.

zlib keeps at most its window and pending output (a few hundred KiB at
level 9, far less at 1), so memory does not grow with the body, and the
client's reading is paused by the upstream's backlog exactly as for a body
sent as it came.
"""

from __future__ import annotations

import zlib
from typing import Final

#: zlib's wbits for a gzip header and trailer (16 + the 32 KiB window).
GZIP_WBITS: Final = 31
#: The last chunk of a chunked body.
LAST_CHUNK: Final = b"0\r\n\r\n"


class Gzip:
    """One request body's compressor, and its bytes before and after (for
    ``proxy_upstream_compression_bytes_total``)."""

    __slots__ = ("_zlib", "after", "before")

    def __init__(self, level: int) -> None:
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, GZIP_WBITS)
        #: Body bytes fed in (as the client sent them).
        self.before = 0
        #: Gzip bytes out so far (without the chunk framing).
        self.after = 0

    def chunk(self, data: bytes) -> bytes:
        """``data`` compressed as one HTTP chunk; b"" when zlib kept it all
        (never an empty chunk: that would end the body)."""
        self.before += len(data)
        out = self._zlib.compress(data)
        if not out:
            return b""
        self.after += len(out)
        return b"%x\r\n%s\r\n" % (len(out), out)

    def end(self) -> bytes:
        """What zlib still held, the gzip trailer and the last chunk."""
        out = self._zlib.flush()
        self.after += len(out)
        return b"%x\r\n%s\r\n%s" % (len(out), out, LAST_CHUNK)
