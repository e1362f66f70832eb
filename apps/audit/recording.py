"""Recording at the API layer: how an endpoint declares what its writes are in the audit trail.

A view that writes (an ``APIView``, a generic view or a viewset) takes :class:`AuditedView` first
among its bases and declares its audited actions::

    class VMViewSet(AuditedView, mixins.ListModelMixin, viewsets.GenericViewSet[VM]):
        audit_actions = {
            "create": AuditAction.VM_CREATE,
            "stop": AuditAction.VM_STOP,
            "batch": {"post": AuditAction.BATCH_CREATE, "delete": AuditAction.BATCH_DELETE},
        }
        audit_fields = ("name", "vcpus")

A ``ModelViewSet`` declares its create, update and delete at once: ``audit_actions = model_writes("node")``.

A key is a viewset's action (``create``, ``partial_update``, ``destroy``, an ``@action``'s name) or
a plain view's handler (``post``, ``patch``); a value is the :class:`~.choices.AuditAction`, or a
mapping of the request's method (lower case) to actions where one view action takes several
methods. Reads are never declared. A new kind of write adds its action to ``choices.AuditAction``.

Once the answer is made (DRF's ``finalize_response``) a declared request writes one event (one
INSERT), whatever its status: refused attempts (400, 403, 404, 409...) are recorded as ``refused``.
Not recorded: 401 (the caller is unknown) and 429 (over its rate: a flood must not write the table);
the API log has both. An exception no handler answers is recorded as a ``failed`` 500, unless the
retry middleware runs the view again (a lost connection), whose run records.

An event holds, through hooks with safe defaults:

- actor: ``request.user`` (none when anonymous);
- project: the request context's ``project_id`` (set where the acting project is resolved); a view
  under a project (``/projects/{pk}/quota/``) names the URL keyword holding it in
  ``audit_project_kwarg``, and where the URL has none (a project's create) the answer's ``id`` is it;
- target (:meth:`AuditedView.audit_target_id`): the URL's lookup (``pk``), else the answer's ``id``,
  else the id of the answer's object named like the target type (``{"batch": {"id": ...}}``);
- detail (:meth:`AuditedView.audit_detail`): the names of the fields sent (``fields``), the values of
  those named in ``audit_fields`` (``values``: scalars only, strings cut), the answer's error code
  (``error``; never its message, which may describe someone else's object), and the id of the object
  the answer is when it is not the target (``result``: the migration a ``vm.migrate`` made).

Never name a secret (a password, a token, user data) in ``audit_fields``: an event keeps the name of
a field sent, never a value the view did not declare.
"""

import itertools
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Final, NoReturn

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.conf import novacron_setting
from apps.core.context import request_context
from apps.core.ids import uuid_text
from apps.core.retry import lost_connection

from .choices import AuditAction
from .models import TARGET_ID_MAX
from .services import audit_record

logger = logging.getLogger(__name__)

#: A declaration: the action, or the actions of one view action by method (lower case).
Declared = AuditAction | Mapping[str, AuditAction]

# 401: the caller is unknown; 429: over its rate (recording would let a flood write the table).
UNRECORDED_STATUSES: Final = frozenset({401, 429})
FIELDS_MAX: Final = 50  # names of the fields sent kept per event (a body of 10 000 keys is not copied)
NAME_MAX_CHARS: Final = 64
VALUE_MAX_CHARS: Final = 200
PROJECT_ID_MAX_DIGITS: Final = 18  # a bigint holds every 18-digit number


def model_writes(target_type: str) -> dict[str, Declared]:
    """The declarations of a ``ModelViewSet``'s writes: ``<target_type>.create``, ``.update`` (PUT
    and PATCH) and ``.delete`` (each must be an :class:`AuditAction`)."""
    update = AuditAction(f"{target_type}.update")
    return {
        "create": AuditAction(f"{target_type}.create"),
        "update": update,
        "partial_update": update,
        "destroy": AuditAction(f"{target_type}.delete"),
    }


def _text(value: Any, limit: int) -> str:
    """Untrusted text as a row can keep it: cut to ``limit``, without NUL (PostgreSQL refuses it in
    text and JSON) or lone surrogates (UTF-8 has none; JSON bodies may carry them)."""
    kept = str(value).replace("\x00", "")[:limit]
    return kept.encode("utf-8", "replace").decode("utf-8")


def sent_fields(request: Request) -> Mapping[str, Any]:
    """The request's body when it is an object of fields; empty when it is none, or unreadable."""
    try:
        data = request.data
    except (APIException, RequestDataTooBig):  # a body no parser reads: the view answered for it
        return {}
    return data if isinstance(data, Mapping) else {}


def answer_of(response: Response | None) -> Mapping[str, Any]:
    """A successful answer's body when it is an object; empty otherwise."""
    data = getattr(response, "data", None)
    if response is None or response.status_code >= 400 or not isinstance(data, Mapping):
        return {}
    return data


def kept_ids(values: Any, *, key: str | None = None) -> list[str]:
    """The ids in ``values`` (a list of ids, or with ``key``, of objects holding one), as an event
    keeps untrusted input: strings cut to a target id's length, at most ``BATCH_MAX_ITEMS``."""
    if not isinstance(values, list):
        return []
    found = (value.get(key) if isinstance(value, Mapping) else None for value in values) if key else values
    ids = (_text(value, TARGET_ID_MAX) for value in found if isinstance(value, (str, int, uuid.UUID)))
    return list(itertools.islice(ids, novacron_setting("BATCH_MAX_ITEMS")))


def _kept_value(value: Any) -> tuple[bool, Any]:
    """Whether a declared field's value is kept (JSON scalars: no NaN, strings as :func:`_text`
    keeps them), and as what."""
    if isinstance(value, str):
        return True, _text(value, VALUE_MAX_CHARS)
    if isinstance(value, float):
        return math.isfinite(value), value
    return (value is None or isinstance(value, (bool, int))), value


def _error_code(response: Response | None) -> str | None:
    if response is None or response.status_code < 400:
        return None
    error = getattr(response, "data", None)
    error = error.get("error") if isinstance(error, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return _text(code, NAME_MAX_CHARS) if code else None


def _canonical_id(value: Any) -> str:
    """A UUID in its canonical form (URLs take any case); any other id as :func:`_text` keeps it."""
    text = _text(value, TARGET_ID_MAX)
    return uuid_text(text) or text


def _as_project_id(value: Any) -> int | None:
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() and len(text) <= PROJECT_ID_MAX_DIGITS else None


class AuditedView(APIView):
    """Records the declared writes of a view (this module's docstring says how to declare them)."""

    audit_actions: ClassVar[Mapping[str, Declared]] = {}
    #: Fields of the body whose values an event keeps (the names of the others only).
    audit_fields: ClassVar[tuple[str, ...]] = ()
    #: The URL keyword naming the project of a view under a project (None: the request context's).
    audit_project_kwarg: ClassVar[str | None] = None

    def audit_action(self, request: Request) -> AuditAction | None:
        """The action a request declares (None: not audited)."""
        method = (request.method or "").lower()
        declared = self.audit_actions.get(getattr(self, "action", None) or method)
        if isinstance(declared, AuditAction) or declared is None:
            return declared
        return declared.get(method)

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        action = self.audit_action(request)
        if action is not None and response.status_code not in UNRECORDED_STATUSES:
            self._record(request, response, action, status=response.status_code)
        return response

    def raise_uncaught_exception(self, exc: Exception) -> NoReturn:
        action = self.audit_action(self.request)
        if action is not None and not lost_connection(exc):
            self._record(self.request, None, action, status=500)
        super().raise_uncaught_exception(exc)

    def _record(
        self, request: Request, response: Response | None, action: AuditAction, *, status: int
    ) -> None:
        user = request.user
        actor_id = user.pk if user.is_authenticated else None
        target_id = self.audit_target_id(request, response, action)
        try:
            audit_record(
                action=action,
                actor_id=actor_id,
                project_id=self.audit_project_id(request, response),
                target_id=target_id,
                request_id=request_context(request._request).request_id,
                status=status,
                detail=self.audit_detail(request, response, target_id=target_id),
            )
        except DatabaseError:
            # The answer stands (its change is made); the lost event is in the log, with the request id.
            logger.exception(
                "audit event not recorded: %s of %s by user %s (%s)", action, target_id, actor_id, status
            )

    def audit_project_id(self, request: Request, response: Response | None) -> int | None:
        """The project the event belongs to (see the module's docstring)."""
        if self.audit_project_kwarg is None:
            return request_context(request._request).project_id
        if self.audit_project_kwarg in self.kwargs:
            return _as_project_id(self.kwargs[self.audit_project_kwarg])
        return _as_project_id(answer_of(response).get("id"))

    def audit_target_id(self, request: Request, response: Response | None, action: AuditAction) -> str:
        """The id of the object acted on ("" when the request named none and made none)."""
        lookup = getattr(self, "lookup_url_kwarg", None) or getattr(self, "lookup_field", "pk")
        if lookup in self.kwargs:
            return _canonical_id(self.kwargs[lookup])
        answer = answer_of(response)
        if "id" in answer:
            return _canonical_id(answer["id"])
        named = answer.get(action.target_type)
        return _canonical_id(named["id"]) if isinstance(named, Mapping) and "id" in named else ""

    def audit_detail(self, request: Request, response: Response | None, *, target_id: str) -> dict[str, Any]:
        """What the event keeps of the request and its answer; never a secret (module docstring)."""
        detail: dict[str, Any] = {}
        sent = sent_fields(request)
        if sent:
            detail["fields"] = [_text(name, NAME_MAX_CHARS) for name in itertools.islice(sent, FIELDS_MAX)]
            values = {}
            for name in self.audit_fields:
                kept, value = _kept_value(sent.get(name)) if name in sent else (False, None)
                if kept:
                    values[name] = value
            if values:
                detail["values"] = values
        code = _error_code(response)
        if code is not None:
            detail["error"] = code
        result = answer_of(response).get("id")
        if result is not None and _canonical_id(result) != target_id:
            detail["result"] = _canonical_id(result)
        return detail
