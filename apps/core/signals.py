"""Signal receivers of ``apps.core``: a token's Redis memo goes when the token or its user changes.

The VM read fast path trusts the memo (user id and staff flag) instead of the database; deleting the
token, deactivating the user or changing their staff flag must take effect on the next request.
"""

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from rest_framework.authtoken.models import Token

from .authentication import forget_tokens


def _forget_now_and_on_commit(keys: list[str]) -> None:
    # Now, so this request's own reads stop trusting it; after commit, so no concurrent request
    # that read the old row re-stored it in between.
    forget_tokens(keys)
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(lambda: forget_tokens(keys))


@receiver(post_delete, sender=Token, dispatch_uid="core.token_deleted")
def token_deleted(sender: type[Token], instance: Token, **kwargs: Any) -> None:
    _forget_now_and_on_commit([instance.key])


@receiver(post_save, sender=get_user_model(), dispatch_uid="core.user_saved")
@receiver(post_delete, sender=get_user_model(), dispatch_uid="core.user_deleted")
def user_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    keys = list(Token.objects.filter(user_id=instance.pk).values_list("key", flat=True))
    _forget_now_and_on_commit(keys)
