"""The Celery application of the control plane (queue ``control``; node queues are ``node.<name>``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "novacron.settings.main")

app = Celery("novacron")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
