"""Outgoing webhooks: a JSON POST signed with HMAC-SHA256 (header ``X-NovaCron-Signature: sha256=<hex>``).

Alerts (``apps.monitoring``) and migration state changes (``apps.migrations``) use it. The receiver
recomputes ``hmac_sha256(<the webhook's secret>, raw body)`` and compares it in constant time before
trusting the payload. Delivery is a Celery task per event, retried with backoff on network errors.
"""

import hashlib
import hmac
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import orjson

SIGNATURE_HEADER = "X-NovaCron-Signature"
TIMEOUT_SECONDS = 10


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_post(*, url: str, secret: str, payload: dict[str, Any], agent: str) -> int:
    """POST ``payload``; returns the HTTP status (urllib raises for 4xx/5xx and network errors)."""
    if urlsplit(url).scheme not in {"http", "https"}:
        raise ValueError(f"webhook URL must be http(s), not {url!r}")
    body = orjson.dumps(payload)
    headers = {"Content-Type": "application/json", "User-Agent": agent}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
        return int(response.status)
