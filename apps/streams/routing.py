"""The streams service's ASGI application: which consumer serves which path, per protocol.

HTTP carries Server-Sent Events; WebSockets carry the VM consoles (``console``, which shares ``hub``
and ``limits`` with the event streams). ASGI lifespan: the process's Redis connections are closed at
shutdown.
"""

from typing import Any

from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path, re_path

from . import hub
from .console import ConsoleConsumer, NoSuchStream
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


websocket_routes = URLRouter(
    [
        path("api/v1/vms/<uuid:vm_id>/console/stream/", ConsoleConsumer.as_asgi()),
        re_path(r"", NoSuchStream.as_asgi()),
    ]
)

application = ProtocolTypeRouter({"http": http_routes, "websocket": websocket_routes, "lifespan": lifespan})
