"""API tokens: what a client sends as ``Authorization: Token <secret>``, stored only as a digest.

Invariants: a secret is ``nc_`` and 43 URL-safe characters (:func:`new_secret`, 256 random bits);
the database holds its SHA-256 (``digest``, unique) and its first :data:`PREFIX_LENGTH` characters
(``prefix``, to tell tokens apart in lists), never the secret, which the client sees once, when the
token is made. A user's tokens have distinct names. A row is written when the token is made and
deleted when it is revoked, never on use. Tokens carried over from DRF's ``authtoken`` (migration
``0002``) keep their 40-hex-digit keys as secrets.
"""

import hashlib
import secrets
from datetime import datetime
from typing import Final

from django.conf import settings
from django.db import models
from django.utils import timezone

SECRET_PREFIX: Final = "nc_"  # noqa: S105 (what every secret starts with, not a secret)
SECRET_BYTES: Final = 32  # random bytes of a secret: 256 bits, as DRF's keys had 160
# Characters of the secret shown in lists: "nc_" and 7 of its 43 random ones (42 of 256 bits).
PREFIX_LENGTH: Final = 10
NAME_MAX_LENGTH: Final = 64


def new_secret() -> str:
    """A new token secret: ``nc_`` and :data:`SECRET_BYTES` random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def token_digest(secret: str) -> str:
    """The SHA-256 (hex) of a secret: what the database stores and looks a token up by.

    A plain hash suffices (no salt, no key stretching): a secret carries 256 random bits (160 for a
    carried-over DRF key), so there is nothing to guess, and a token is looked up by its digest."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=NAME_MAX_LENGTH, help_text="Unique among the user's tokens.")
    digest = models.CharField(max_length=64, unique=True, editable=False, help_text="SHA-256 of the secret.")
    prefix = models.CharField(
        max_length=PREFIX_LENGTH, editable=False, help_text="The secret's first characters."
    )
    # A default rather than auto_now_add: tokens carried over from DRF keep their creation time.
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused from then on; empty: never.")
    read_only = models.BooleanField(default=False, help_text="Only GET, HEAD and OPTIONS requests.")

    class Meta:
        db_table = "api_tokens"
        ordering = ("-created_at", "-id")
        verbose_name = "API token"
        constraints = [
            models.UniqueConstraint(fields=("user", "name"), name="api_token_name_unique_per_user"),
            models.CheckConstraint(
                condition=models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=models.F("created_at")),
                name="api_token_expires_after_creation",
                violation_error_message="A token must expire after it is made.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @classmethod
    def for_secret(
        cls,
        secret: str,
        *,
        user_id: int,
        name: str,
        expires_at: datetime | None = None,
        read_only: bool = False,
    ) -> "ApiToken":
        """An unsaved token whose secret is ``secret`` (only its digest and prefix are kept)."""
        return cls(
            user_id=user_id,
            name=name,
            digest=token_digest(secret),
            prefix=secret[:PREFIX_LENGTH],
            expires_at=expires_at,
            read_only=read_only,
        )

    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()
