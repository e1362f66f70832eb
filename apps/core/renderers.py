"""The API's JSON renderer: DRF's JSON output, byte for byte, produced by orjson.

orjson serializes dicts, lists, strings and numbers natively, faster than the standard
library. Types it would format differently from DRF (dates and times: DRF writes ``Z`` for UTC and
cuts times to milliseconds) or does not know (lazy strings, Decimal, querysets...) are handed to
DRF's own encoder, so the bytes are the same as ``rest_framework.renderers.JSONRenderer``'s. A
client asking for indentation (``Accept: application/json; indent=4``) gets DRF's renderer.
"""

from collections.abc import Mapping
from typing import Any

import orjson
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.encoders import JSONEncoder

_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
_UTC_DATETIME_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
_drf_encoder = JSONEncoder()

# DRF escapes these two so that its JSON is also valid JavaScript; so do we.
_LINE_SEPARATOR = "\u2028".encode()
_PARAGRAPH_SEPARATOR = "\u2029".encode()


def _default(value: Any) -> Any:
    return _drf_encoder.default(value)


def dumps(data: Any, *, utc_datetimes: bool = False) -> bytes:
    """``data`` as compact UTF-8 JSON, exactly as DRF's JSON renderer would write it.

    ``utc_datetimes``: ``data``'s datetimes are aware UTC values to be written as DRF's
    ``DateTimeField`` writes them (``2026-01-01T00:00:01.250000Z``), which orjson does itself, about
    ten times faster than formatting them in Python first.
    """
    option = _UTC_DATETIME_OPTIONS if utc_datetimes else _ORJSON_OPTIONS
    body = orjson.dumps(data, default=_default, option=option)
    if _LINE_SEPARATOR in body or _PARAGRAPH_SEPARATOR in body:
        body = body.replace(_LINE_SEPARATOR, b"\\u2028").replace(_PARAGRAPH_SEPARATOR, b"\\u2029")
    return body


class ORJSONRenderer(JSONRenderer):
    """``application/json`` through orjson; DRF's renderer when indentation is asked for."""

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        if data is None:
            return b""
        if self.get_indent(accepted_media_type or "", renderer_context or {}) is not None:
            return super().render(data, accepted_media_type, renderer_context)
        return dumps(data)
