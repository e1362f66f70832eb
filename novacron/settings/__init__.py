"""NovaCron settings, split by topic; every module reads the environment through ``env``."""

import django_stubs_ext

# Makes generic classes (ModelAdmin[VM], QuerySet[VM]...) subscriptable at run time for type hints.
django_stubs_ext.monkeypatch()


from .base import *  # noqa: F403
from .cache import *  # noqa: F403
from .celery import *  # noqa: F403
from .database import *  # noqa: F403
from .logging import *  # noqa: F403
from .novacron import *  # noqa: F403
from .rest import *  # noqa: F403
