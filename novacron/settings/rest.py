"""Django REST framework and the OpenAPI schema."""

from .env import env

REST_FRAMEWORK = {
    # OPTIONS on a collection route that accepts PUT (vms/batch/) must not 500 (apps/core/metadata.py).
    "DEFAULT_METADATA_CLASS": "apps.core.metadata.CollectionSafeMetadata",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.core.authentication.FastTokenAuthentication",  # hashed API tokens, one prepared query
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        # DRF's JSON output produced by orjson; the browsable API stays for people.
        "apps.core.renderers.ORJSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "apps.core.pagination.CreatedCursorPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apps.core.errors.exception_handler",
    # Fixed-window counters (one Redis round trip); DRF's classes rewrite a list of every request.
    "DEFAULT_THROTTLE_CLASSES": [
        "apps.core.throttling.UserWindowThrottle",
        "apps.core.throttling.AnonWindowThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "user": env("THROTTLE_USER", "6000/min", help="API requests a user may make (DRF rate syntax)."),
        "anon": env("THROTTLE_ANON", "120/min", help="Unauthenticated API requests per client address."),
        "token": env("THROTTLE_TOKEN", "10/min", help="Token requests (login attempts) per client address."),
        "console": env(
            "THROTTLE_CONSOLE", "30/min", help="Console tickets a user may ask for (DRF rate syntax)."
        ),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "NovaCron API",
    "DESCRIPTION": "VM-fleet control plane: VMs, batches, nodes, images and migrations.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "apps.vms.choices.NodeStatus",
        "VMStateEnum": "apps.vms.choices.VMState",
        "ImageKindEnum": "apps.vms.choices.ImageKind",
        "BatchKindEnum": "apps.vms.choices.BatchKind",
        "BatchStatusEnum": "apps.vms.choices.BatchStatus",
        "BatchItemStatusEnum": "apps.vms.choices.BatchItemStatus",
        "MigrationStatusEnum": "apps.migrations.choices.MigrationStatus",
        "MigrationModeEnum": "apps.migrations.choices.MigrationMode",
        "AuditActionEnum": "apps.audit.choices.AuditAction",
        "AuditOutcomeEnum": "apps.audit.choices.Outcome",
    },
}
