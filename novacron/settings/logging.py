"""Logging: one line per record to stderr, levels from the environment."""

from .env import env

LOG_LEVEL = env("LOG_LEVEL", "INFO", help="Log level of NovaCron's own loggers (DEBUG, INFO, WARNING...).")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        "apps": {"level": LOG_LEVEL},
        "workers": {"level": LOG_LEVEL},
        "novacron": {"level": LOG_LEVEL},
    },
}
