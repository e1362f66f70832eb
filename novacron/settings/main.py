"""All of NovaCron's settings, composed from the topic modules (``DJANGO_SETTINGS_MODULE``)."""

import django_stubs_ext

from .cache import *  # noqa: F403
from .celery import *  # noqa: F403
from .database import *  # noqa: F403
from .django import *  # noqa: F403
from .logging import *  # noqa: F403
from .monitoring import *  # noqa: F403
from .novacron import *  # noqa: F403
from .rest import *  # noqa: F403
from .streams import *  # noqa: F403

# Makes generic classes (ModelAdmin[VM], QuerySet[VM]...) subscriptable at run time for type hints.
django_stubs_ext.monkeypatch()
