"""Reads of accounts: a user's own tokens (nobody reads another's), and the users staff manage."""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db.models import QuerySet

from .models import ApiToken


def tokens_of(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[ApiToken]:
    """The tokens of ``user``, newest first: the only tokens the API shows them (none: anonymous)."""
    if user.pk is None:
        return ApiToken.objects.none()
    return ApiToken.objects.filter(user_id=user.pk)


def users() -> QuerySet[User]:
    """Every user, by username (what staff manage)."""
    return get_user_model().objects.order_by("username")
