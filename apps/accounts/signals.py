"""Signal receivers of ``apps.accounts``: a token's Redis memo goes when the token or its user changes.

The VM read fast path trusts the memo (user id and staff flag) instead of the database; revoking the
token, deactivating the user or changing their staff flag must take effect on the next request,
whichever path made the change (the API's services, the admin, a shell), hence receivers.
"""

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from apps.core.authentication import forget_tokens
from apps.core.db import now_and_after_commit

from .models import ApiToken


def _forget_now_and_on_commit(digests: list[str]) -> None:
    # (After commit too, though the tombstone also refuses a memo re-stored in between.)
    now_and_after_commit(lambda: forget_tokens(digests))


@receiver(post_delete, sender=ApiToken, dispatch_uid="accounts.token_deleted")
def token_deleted(sender: type[ApiToken], instance: ApiToken, **kwargs: Any) -> None:
    _forget_now_and_on_commit([instance.digest])


@receiver(post_save, sender=get_user_model(), dispatch_uid="accounts.user_saved")
@receiver(post_delete, sender=get_user_model(), dispatch_uid="accounts.user_deleted")
def user_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    digests = list(ApiToken.objects.filter(user_id=instance.pk).values_list("digest", flat=True))
    _forget_now_and_on_commit(digests)
