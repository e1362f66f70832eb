"""What one layer of a request learns and a later one reads, as one typed value.

A middleware that knows something about a request that a later layer needs (which rate windows
already count it) writes it into the request's :class:`RequestContext` (:func:`request_context`),
and the layers after it (DRF's throttles) read it there: no ad-hoc attributes set on the request.

:class:`Viewer` is the caller as the read paths and the response cache see them. It is also what a
token's memo in Redis holds (:mod:`apps.core.authentication`), as a hash of its fields, so the
Lua of the fast path reads it by the field names given to it from here (:data:`VIEWER_FIELDS`).
"""

from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Final

from django.contrib.auth import get_user_model
from django.http import HttpRequest


@dataclass(frozen=True)
class Viewer:
    """A caller of the API: their user id and whether they are staff."""

    user_id: int
    is_staff: bool

    def as_memo(self) -> dict[str, int]:
        """The Redis hash of a token's memo (integers: Redis stores strings)."""
        return {"user_id": self.user_id, "is_staff": int(self.is_staff)}

    @classmethod
    def from_memo(cls, values: list[Any]) -> "Viewer":
        """The viewer of a memo's hash values, read in :data:`VIEWER_FIELDS` order."""
        user_id, is_staff = values
        return cls(user_id=int(user_id), is_staff=int(is_staff) == 1)


#: The memo hash's field names, in :meth:`Viewer.from_memo`'s order (the fast path's Lua reads them).
VIEWER_FIELDS: Final = tuple(item.name for item in fields(Viewer))


class MemoUser:
    """``request.user`` of a request whose caller is known from their token's memo (no query made).

    Has what a permission class usually reads (``pk``, ``is_staff``, ``is_authenticated``,
    ``is_active``); any other attribute loads the user from the database on first use, so a
    permission class reading more (groups, a profile) sees the real user.
    """

    is_authenticated: Final = True
    is_anonymous: Final = False
    is_active: Final = True  # only active users' tokens are remembered

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.pk = self.id = viewer.user_id
        self.is_staff = viewer.is_staff

    @cached_property
    def loaded(self) -> Any:
        return get_user_model()._default_manager.get(pk=self.pk)

    def __getattr__(self, name: str) -> Any:
        if name == "loaded" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.loaded, name)


@dataclass
class RequestContext:
    """What the middlewares learned about one request that a later layer reads.

    ``counted_scopes``: the rate-limit scopes whose window already counts this request (the VM read
    fast path's look-up counts them in Redis); DRF's throttle of such a scope does not count it again.
    ``project_id``: the project the request acts in, once resolved (None: not yet, or a staff
    caller's fleet-wide view); the audit trail records it.
    ``request_id``: the request's id, which the monitoring middleware honours or mints and echoes
    as ``X-Request-ID`` ("" where that middleware did not run); API logs and audit events carry it.
    (The caller a middleware knows goes into ``request.user``, Django's own place for it.)
    """

    counted_scopes: frozenset[str] = field(default_factory=frozenset)
    project_id: int | None = None
    request_id: str = ""


_ATTRIBUTE: Final = "novacron_context"


def request_context(request: HttpRequest) -> RequestContext:
    """The request's context, made empty on first use."""
    found = request.__dict__.get(_ATTRIBUTE)
    if found is None:
        found = request.__dict__[_ATTRIBUTE] = RequestContext()
    assert isinstance(found, RequestContext)
    return found
