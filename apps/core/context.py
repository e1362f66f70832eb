"""What one layer of a request learns and a later one reads, as one typed value.

A middleware that knows something about a request that a later layer needs (which rate windows
already count it) writes it into the request's :class:`RequestContext` (:func:`request_context`),
and the layers after it (DRF's throttles) read it there: no ad-hoc attributes set on the request.

:class:`Viewer` is the caller as the read paths and the response cache see them; :class:`Acting`
where a request acts (project and role). :class:`Caller` is what a token's memo in Redis holds
(:mod:`apps.core.authentication`), as a hash whose field names the Lua of the fast path is given
from here (:data:`MEMO_FIELDS`, :data:`ROLE_FIELD_PREFIX`).
"""

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from django.contrib.auth import get_user_model
from django.http import HttpRequest


@dataclass(frozen=True)
class Viewer:
    """A caller of the API as the read paths and the response cache see them: who they are and the
    project their reads are of (None: a staff caller's whole fleet, when they name no project)."""

    user_id: int
    is_staff: bool
    project_id: int | None


#: A token's memo: a Redis hash of these fields, then ``ROLE_FIELD_PREFIX + <project id>`` -> role
#: for each project the user is a member of (the fast path's Lua reads them by these names).
MEMO_FIELDS: Final = ("user_id", "is_staff", "project")
ROLE_FIELD_PREFIX: Final = "role:"


@dataclass(frozen=True)
class Caller:
    """Who calls and where they may act: the user, their personal project (where a request naming
    no project acts) and their role in each of their projects, ``(project id, role)`` sorted. What a
    token's memo holds, and what authentication reads with the token."""

    user_id: int
    is_staff: bool
    personal_project: int
    roles: tuple[tuple[int, str], ...]

    def role(self, project_id: int) -> str | None:
        """The caller's role in a project (None: not a member)."""
        return next((role for project, role in self.roles if project == project_id), None)

    def as_memo(self) -> dict[str, int | str]:
        """The Redis hash of the memo (integers: Redis stores strings)."""
        memo: dict[str, int | str] = dict(
            zip(MEMO_FIELDS, (self.user_id, int(self.is_staff), self.personal_project), strict=True)
        )
        memo.update({f"{ROLE_FIELD_PREFIX}{project}": role for project, role in self.roles})
        return memo


@dataclass(frozen=True)
class Acting:
    """Where a request acts: its project (None: a staff caller naming none reads the whole fleet)
    and the caller's role there (None: not a member; staff act anyway)."""

    project_id: int | None
    role: str | None


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
    ``acting``: where the request acts, once resolved (``apps.projects.acting``, or the fast path
    from the token's memo); :attr:`project_id` is its project, which the audit trail records.
    ``caller``: the caller and their projects, as authentication read them with the token (None:
    not read yet; :func:`apps.projects.acting.caller` reads them once otherwise).
    ``request_id``: the request's id, which the monitoring middleware honours or mints and echoes
    as ``X-Request-ID`` ("" where that middleware did not run); API logs and audit events carry it.
    (The caller a middleware knows goes into ``request.user``, Django's own place for it.)
    """

    counted_scopes: frozenset[str] = field(default_factory=frozenset)
    acting: Acting | None = None
    caller: Caller | None = None
    request_id: str = ""

    @property
    def project_id(self) -> int | None:
        """The project the request acts in (None: not resolved, or a staff caller's whole fleet)."""
        return None if self.acting is None else self.acting.project_id


_ATTRIBUTE: Final = "novacron_context"


def request_context(request: HttpRequest | Any) -> RequestContext:
    """The request's context, made empty on first use (``request``: Django's, or DRF's around it)."""
    django_request = getattr(request, "_request", request)  # a DRF Request keeps Django's here
    found = django_request.__dict__.get(_ATTRIBUTE)
    if found is None:
        found = django_request.__dict__[_ATTRIBUTE] = RequestContext()
    assert isinstance(found, RequestContext)
    return found
