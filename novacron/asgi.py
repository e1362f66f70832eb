"""ASGI entry point: the streams service (``apps.streams``), served by granian ``--interface asgi``
on ``STREAMS_PORT``. The REST API stays on WSGI (``novacron.wsgi``)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "novacron.settings.main")
django.setup()

from apps.streams.routing import application  # noqa: E402  (models load after setup)

__all__ = ["application"]
