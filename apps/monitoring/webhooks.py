"""Alert webhooks: a JSON POST signed with HMAC-SHA256 (header ``X-NovaCron-Signature: sha256=<hex>``).

The receiver recomputes ``hmac_sha256(ALERT_WEBHOOK_SECRET, raw body)`` and compares it in constant
time before trusting the payload.
"""

import hashlib
import hmac
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import orjson

from .models import Alert

SIGNATURE_HEADER = "X-NovaCron-Signature"
TIMEOUT_SECONDS = 10


def alert_payload(alert: Alert, event: str) -> dict[str, Any]:
    return {
        "event": event,
        "alert": {
            "id": alert.pk,
            "rule": alert.rule.name,
            "metric": alert.rule.metric,
            "subject": alert.subject,
            "status": alert.status,
            "severity": alert.severity,
            "value": alert.value,
            "threshold": alert.rule.threshold,
            "message": alert.message,
            "started_at": alert.started_at.isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        },
    }


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_post(*, url: str, secret: str, payload: dict[str, Any]) -> int:
    """POST ``payload``; returns the HTTP status (urllib raises for 4xx/5xx and network errors)."""
    if urlsplit(url).scheme not in {"http", "https"}:
        raise ValueError(f"alert webhook URL must be http(s), not {url!r}")
    body = orjson.dumps(payload)
    headers = {"Content-Type": "application/json", "User-Agent": "NovaCron-alerts"}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
        return int(response.status)
