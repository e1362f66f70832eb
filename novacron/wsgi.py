"""WSGI entry point (granian serves it: ``granian --interface wsgi novacron.wsgi:application``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "novacron.settings.main")

application = get_wsgi_application()
