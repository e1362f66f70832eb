"""``POST /api/v1/vms/{id}/console/``: a console ticket and the WebSocket URL to use it on.

Served as an action of the VM viewset (``apps.vms.views``), so its tenancy is the VM retrieve's
(another project's VM: 404) and its role check a write's (readers: 403); rate limited per user
(throttle scope ``console``)."""

from django.http import HttpRequest
from rest_framework import serializers

from apps.core.throttling import WindowRateThrottle
from apps.streams.links import streams_base

from .services import ConsoleGrant


class ConsoleThrottle(WindowRateThrottle):
    """Console tickets a user may ask for (rate ``console``)."""

    scope = "console"
    counts = "users"


class ConsoleTicketSerializer(serializers.Serializer[ConsoleGrant]):
    ticket = serializers.CharField(help_text="Single use, bound to you and this VM.")
    url = serializers.CharField(help_text="The WebSocket to open with it (on the streams service).")
    expires_in = serializers.IntegerField(help_text="Seconds the ticket stays valid.")


def stream_url(request: HttpRequest, grant: ConsoleGrant) -> str:
    """The console's WebSocket URL on the streams service, ws:// or wss:// as the request came."""
    base = streams_base(request)
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}/api/v1/vms/{grant.vm_id}/console/stream/?ticket={grant.ticket}"


def ticket_body(request: HttpRequest, grant: ConsoleGrant) -> dict[str, object]:
    return {"ticket": grant.ticket, "url": stream_url(request, grant), "expires_in": grant.expires_in}
