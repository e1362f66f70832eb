"""Django core settings: applications, middleware, security, templates, static files."""

from pathlib import Path

from .env import env, env_bool, env_list

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(
    env("NOVACRON_VAR_DIR", str(BASE_DIR / "var"), help="Directory for the SQLite file, logs and run files.")
)

DEBUG = env_bool("DEBUG", False, help="Django debug mode; never on in production.")
if DEBUG:
    SECRET_KEY = env(
        "SECRET_KEY", "insecure-debug-only-key", help="Django secret key; required when DEBUG is off."
    )
else:
    SECRET_KEY = env("SECRET_KEY", help="Django secret key; required when DEBUG is off.")

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", ["127.0.0.1", "localhost"], help="Comma-separated host names the web server answers to."
)
CSRF_TRUSTED_ORIGINS = env_list(
    "CSRF_TRUSTED_ORIGINS", [], help="Comma-separated origins (scheme://host:port) trusted for session POSTs."
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "apps.core",
    "apps.accounts",
    "apps.vms",
    "apps.migrations",
    "apps.monitoring",
    "apps.projects",
    "apps.audit",
    "apps.networks",
    "apps.images",
    "apps.consoles",
]

MIDDLEWARE = [
    # Outermost: request ids, timing, Prometheus and API logs see every response.
    "apps.monitoring.middleware.RequestMonitorMiddleware",
    # gzip for bodies of 1 KiB and more (compresses what every middleware below produced).
    "apps.core.middleware.SizedGZipMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A cache in front of VMViewSet's list and detail for token callers, before DRF, with the view's
    # permissions, throttles and headers (apps/vms/middleware.py). Its answers get the security and
    # frame headers above; the middlewares below would add nothing to them (no session, cookie, CSRF
    # token or message is used), so they are skipped.
    "apps.vms.middleware.VMReadFastPathMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Innermost: runs the view again when its database connection died mid-request (apps/core/retry.py).
    "apps.core.retry.RetryOnLostConnectionMiddleware",
]

ROOT_URLCONF = "novacron.urls"
WSGI_APPLICATION = "novacron.wsgi.application"
ASGI_APPLICATION = "novacron.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Request bodies: a batch of 1000 VMs is ~150 KiB of JSON; 2 MiB leaves room and bounds memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
_HTTPS = env_bool(
    "HTTPS", False, help="Set when served behind TLS: secure cookies, HSTS and the SSL redirect."
)
SESSION_COOKIE_SECURE = _HTTPS
CSRF_COOKIE_SECURE = _HTTPS
SECURE_SSL_REDIRECT = _HTTPS
SECURE_HSTS_SECONDS = 31536000 if _HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = _HTTPS
SECURE_HSTS_PRELOAD = _HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if _HTTPS else None
