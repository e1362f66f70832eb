"""Response compression: gzip for bodies of at least ``GZIP_MIN_BYTES`` when the client accepts it.

Django's ``GZipMiddleware`` compresses anything from 200 bytes; below about a kilobyte the CPU spent
saves less than one TCP segment, so small answers (a VM's detail, errors, health) go out as they
are. Everything else (Vary: Accept-Encoding, weak ETags, streaming bodies) is Django's.
"""

from django.http import HttpRequest, HttpResponseBase
from django.middleware.gzip import GZipMiddleware

#: Smallest body worth compressing: a kilobyte (bodies below it fit one segment either way).
GZIP_MIN_BYTES = 1024


class SizedGZipMiddleware(GZipMiddleware):
    """``GZipMiddleware`` with a floor: non-streaming bodies under ``GZIP_MIN_BYTES`` stay plain."""

    min_bytes = GZIP_MIN_BYTES

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if not response.streaming and len(response.content) < self.min_bytes:  # type: ignore[attr-defined]
            return response
        return super().process_response(request, response)
