"""The streams service's ASGI application: which consumer serves which path, per protocol.

HTTP carries Server-Sent Events; a WebSocket router joins ``ProtocolTypeRouter`` beside it when the
first WebSocket consumer (the VM console) exists, reusing ``access`` (its scope has the same headers,
cookies and query string), ``hub`` and ``limits``. ASGI lifespan: the process's Redis connections
are closed at shutdown.
"""

from typing import Any

from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path, re_path

from . import hub
from .migrations import MigrationEventsConsumer
from .sse import HealthConsumer, NotFoundConsumer

http_routes = URLRouter(
    [
        path("api/v1/migrations/<str:migration_id>/events/", MigrationEventsConsumer.as_asgi()),
        path("healthz", HealthConsumer.as_asgi()),
        re_path(r"", NotFoundConsumer.as_asgi()),
    ]
)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await hub.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter({"http": http_routes, "lifespan": lifespan})
