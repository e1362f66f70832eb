"""ASGI entry point, for servers that speak ASGI (server-sent progress streams)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "novacron.settings.main")

application = get_asgi_application()
