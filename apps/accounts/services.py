"""Writes of accounts: tokens made and revoked; users made, changed and given a new password.

Invariants: a token's secret leaves this module only in the :class:`IssuedToken` of its creation,
and is stored only as its digest; a token expires in the future or never. A staff user cannot take
away their own staff flag or deactivate themselves (the API would have no way back). Every change
of what a token may do (revocation, deactivation, staff flag) is in force on the next request: the
saved or deleted rows' signals drop the tokens' memos (``signals.py``).
"""

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from apps.core.errors import InvalidInput

from .models import PREFIX_LENGTH, SECRET_PREFIX, ApiToken, new_secret


@dataclass(frozen=True)
class IssuedToken:
    """A token just made and its secret, which is shown to its owner this once."""

    token: ApiToken
    secret: str


@transaction.atomic
def token_create(
    *,
    user: AbstractBaseUser,
    name: str | None = None,
    expires_at: datetime | None = None,
    read_only: bool = False,
) -> IssuedToken:
    """A new token of ``user``; without a ``name``, ``token-`` and the secret's first characters."""
    secret = new_secret()
    name = name or f"token-{secret[len(SECRET_PREFIX) : PREFIX_LENGTH]}"
    token = ApiToken.for_secret(
        secret, user_id=user.pk, name=name, expires_at=expires_at, read_only=read_only
    )
    if expires_at is not None and expires_at <= token.created_at:  # the row's check constraint
        raise InvalidInput(
            "expires_at: a token must expire in the future.",
            fields={"expires_at": ["Give a time in the future, or none for a token that never expires."]},
        )
    try:
        with transaction.atomic():
            token.save(force_insert=True)
    except IntegrityError as exc:  # (user, name): the digest of 256 random bits does not collide
        raise InvalidInput(
            f"name: you already have a token named {name!r}.",
            fields={"name": [f"You already have a token named {name!r}; choose another name."]},
        ) from exc
    return IssuedToken(token=token, secret=secret)


def token_revoke(*, token: ApiToken) -> None:
    """Delete ``token``: refused from the next request on, the fast path included."""
    token.delete()


def _checked_password(password: str, user: User) -> None:
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise InvalidInput(f"password: {exc.messages[0]}", fields={"password": list(exc.messages)}) from exc


@transaction.atomic
def user_create(*, username: str, password: str, email: str = "", is_staff: bool = False) -> User:
    """A new active user, their password checked by ``AUTH_PASSWORD_VALIDATORS``."""
    user_model = get_user_model()
    user = user_model(username=username, email=user_model.objects.normalize_email(email), is_staff=is_staff)
    _checked_password(password, user)
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save(force_insert=True)
    except IntegrityError as exc:
        raise InvalidInput(
            f"username: {username!r} is taken.",
            fields={"username": ["A user with that username already exists."]},
        ) from exc
    return user


@transaction.atomic
def user_update(
    *,
    user: User,
    actor: AbstractBaseUser,
    is_active: bool | None = None,
    is_staff: bool | None = None,
    email: str | None = None,
) -> User:
    """Change what is given (None: unchanged); a deactivated user's tokens are refused at once."""
    if user.pk == actor.pk and (is_active is False or is_staff is False):
        field = "is_active" if is_active is False else "is_staff"
        raise InvalidInput(
            f"{field}: you cannot take this from yourself; another staff user can.",
            fields={field: ["Staff users cannot deactivate themselves or drop their own staff flag."]},
        )
    normalized = None if email is None else get_user_model().objects.normalize_email(email)
    given = {"is_active": is_active, "is_staff": is_staff, "email": normalized}
    changes = {field: value for field, value in given.items() if value is not None}
    for field, value in changes.items():
        setattr(user, field, value)
    if changes:
        user.save(update_fields=list(changes))
    return user


@transaction.atomic
def user_set_password(*, user: User, password: str, revoke_tokens: bool = False) -> None:
    """Set ``user``'s password (checked by the validators); with ``revoke_tokens``, delete their tokens."""
    _checked_password(password, user)
    user.set_password(password)
    user.save(update_fields=["password"])
    if revoke_tokens:
        ApiToken.objects.filter(user_id=user.pk).delete()  # each row's signal drops its memo
