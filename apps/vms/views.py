"""VM, batch, node and user endpoints. Thin: validate, call one service, serialize.

The VM list, VM detail and ``users/me`` read through the response cache (:mod:`.cache`) when the
answer is JSON; a miss reads its page or VM with fixed SQL (:mod:`.reads`; the list's ``node`` and
``name`` filters through the ORM and ``selectors.vm_rows``), and the detail carries an ETag and
answers ``If-None-Match`` with 304 (:func:`vm_read_response`, which the fast path answers with too).
Every VM in an answer is :mod:`.representation`'s.
"""

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import orjson
import xxhash
from django.db.models import Count, Prefetch, QuerySet, prefetch_related_objects
from django.http import Http404, HttpResponse, HttpResponseBase, HttpResponseNotModified
from django.utils.html import format_html
from django.utils.safestring import SafeString
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView, answer_of, kept_ids, model_writes, sent_fields
from apps.consoles.pages import console_path
from apps.consoles.services import console_open
from apps.consoles.views import ConsoleThrottle, ConsoleTicketSerializer, ticket_body
from apps.core.auth import request_user
from apps.core.conf import novacron_setting
from apps.core.context import Viewer
from apps.core.errors import InvalidInput, TooManyItems
from apps.core.ids import uuid_text
from apps.core.permissions import IsStaffOrReadOnly
from apps.core.renderers import ORJSONRenderer, dumps
from apps.migrations.serializers import MigrateRequestSerializer, MigrationSerializer
from apps.migrations.services import migration_request
from apps.networks.nics import NICS_PREFETCH
from apps.projects.acting import viewer as acting_viewer
from apps.projects.acting import write_project
from apps.projects.permissions import ProjectRole

from . import cache as vm_cache
from . import reads, services
from .choices import VMAction
from .filters import VMFilter
from .models import VM, BatchItem, BatchOperation, Node
from .representation import vm_data
from .selectors import (
    Usage,
    batch_visible,
    project_usage,
    user_profile,
    vm_list,
    vm_row_data,
    vm_rows,
    vm_visible_to,
)
from .serializers import (
    BatchSerializer,
    BatchSummarySerializer,
    MeSerializer,
    NodeSerializer,
    VMBatchCreateSerializer,
    VMBatchDeleteSerializer,
    VMBatchUpdateSerializer,
    VMCreateSerializer,
    VMSerializer,
    VMUpdateSerializer,
)

BatchResponse = inline_serializer(
    "BatchResponse", fields={"batch": BatchSummarySerializer(), "vms": VMSerializer(many=True)}
)


def _batch_response(batch: BatchOperation, vms: list[VM]) -> Response:
    batch = BatchOperation.objects.get(pk=batch.pk)
    # The items' counts by one aggregate, not a thousand items loaded as models to count them.
    counts = dict(
        BatchItem.objects.filter(batch_id=batch.pk).order_by().values_list("status").annotate(Count("id"))
    )
    summary = BatchSummarySerializer(batch, context={"counts": counts}).data
    prefetch_related_objects(vms, NICS_PREFETCH)  # the VMs' NICs by one query, not one per VM
    body = {"batch": summary, "vms": [vm_data(vm) for vm in vms]}
    return Response(body, status=status.HTTP_202_ACCEPTED)


def _check_list_size(data: Any, key: str) -> None:
    """Refuse an oversized batch before validating its items (413, not a thousand item errors)."""
    if isinstance(data, dict) and isinstance(data.get(key), list):
        limit = novacron_setting("BATCH_MAX_ITEMS")
        if len(data[key]) > limit:
            raise TooManyItems(f"A batch holds at most {limit} items; this one has {len(data[key])}.")


def _viewer(request: Request) -> Viewer:
    return acting_viewer(request)


def plain_json(renderer: Any, media_type: str) -> bool:
    """DRF's negotiation chose compact JSON (not the browsable API, not indented): cacheable bytes."""
    return isinstance(renderer, ORJSONRenderer) and "indent" not in media_type


def checks_objects(view: APIView) -> bool:
    """Whether a permission class of ``view`` decides per object (its own ``has_object_permission``):
    then a detail is answered after ``get_object`` has checked it."""
    default = permissions.BasePermission.has_object_permission
    return any(type(permission).has_object_permission is not default for permission in view.get_permissions())


def body_etag(body: bytes) -> str:
    return f'"{xxhash.xxh3_64_hexdigest(body)}"'


def vm_read_response(meta: dict[str, Any], body: bytes, *, detail: bool) -> HttpResponseBase:
    """The answer of a VM list page or detail whose JSON is ``body``, before the view's headers.

    A detail carries an ETag; ``If-None-Match`` (``meta``: the request's) naming it (weak
    comparison: gzip turns tags weak) or ``*`` answers 304 without a body.
    """
    if not detail:
        return HttpResponse(body, content_type="application/json")
    etag = body_etag(body)
    named = meta.get("HTTP_IF_NONE_MATCH", "")
    tags = {tag.strip().removeprefix("W/") for tag in named.split(",")} if named else set()
    response: HttpResponseBase
    if etag in tags or "*" in tags:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type="application/json")
    response["ETag"] = etag
    return response


class VMViewSet(
    AuditedView,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet[VM],
):
    """VMs of the project the request acts in (``X-Project`` header or ``project`` parameter, an id
    or a name; else the caller's personal project); staff naming no project see every VM. Any role
    reads, ``member`` and ``admin`` act."""

    audit_actions = {
        "create": AuditAction.VM_CREATE,
        "partial_update": AuditAction.VM_UPDATE,
        "destroy": AuditAction.VM_DELETE,
        "start": AuditAction.VM_START,
        "stop": AuditAction.VM_STOP,
        "reboot": AuditAction.VM_REBOOT,
        "migrate": AuditAction.VM_MIGRATE,
        "console": AuditAction.VM_CONSOLE,
        "batch": {
            "post": AuditAction.BATCH_CREATE,
            "put": AuditAction.BATCH_UPDATE,
            "delete": AuditAction.BATCH_DELETE,
        },
    }
    audit_fields = (
        "name",
        "image",
        "node",
        "vcpus",
        "memory_mb",
        "disk_gb",
        "mode",
        "dest_node",
        "bandwidth_limit_mbps",
    )

    # The JSON list and detail are cached (.cache) and read by .reads (the ORM path for the node and
    # name filters, and on SQLite); the VM read fast path (.middleware) answers the same reads before
    # DRF for callers known by their token's memo, with this view's permissions, throttles,
    # negotiation and headers. (A comment: drf-spectacular publishes the docstring.)

    serializer_class = VMSerializer
    filterset_class = VMFilter
    permission_classes = (permissions.IsAuthenticated, ProjectRole)
    lookup_value_regex = "[0-9a-fA-F-]{36}"

    def get_queryset(self) -> QuerySet[VM]:
        viewer = _viewer(self.request)
        if self.action == "list":
            # The browsable API's page shows instances: their NICs by one query.
            visible = vm_list(viewer=viewer, include_deleted="state" in self.request.query_params)
            return visible.prefetch_related(NICS_PREFETCH)
        return vm_visible_to(viewer)

    def _wants_plain_json(self, request: Request) -> bool:
        return plain_json(getattr(request, "accepted_renderer", None), request.accepted_media_type or "")

    def list(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:  # type: ignore[override]
        """One page of VMs: the cached body, or rows read with ``.values()`` and cached."""
        if not self._wants_plain_json(request):
            return super().list(request, *args, **kwargs)
        viewer = _viewer(request)
        entry = vm_cache.vm_list_entry(viewer=viewer, query=request.META.get("QUERY_STRING", ""))
        body = entry.body or reads.vm_page(request, viewer=viewer)
        if body is None:  # a filter only the ORM path knows, SQLite, or a cursor it should refuse
            queryset = vm_rows(self.filter_queryset(self.get_queryset()))
            page = self.paginate_queryset(queryset)
            assert page is not None  # every list is paginated (DEFAULT_PAGINATION_CLASS)
            body = dumps(self.get_paginated_response([vm_row_data(row) for row in page]).data)
        if entry.body is None:
            entry.store(body)
        return vm_read_response(request.META, body, detail=False)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:  # type: ignore[override]
        """One VM, with an ETag; ``If-None-Match`` with the current tag answers 304 without a body."""
        if not self._wants_plain_json(request):
            return super().retrieve(request, *args, **kwargs)
        vm_id = uuid_text(kwargs["pk"])
        if vm_id is None:
            raise Http404
        if checks_objects(self):
            self.get_object()  # the object permissions (403, or 404 when not visible)
        viewer = _viewer(request)
        entry = vm_cache.vm_detail_entry(
            viewer=viewer, vm_id=vm_id, query=request.META.get("QUERY_STRING", "")
        )
        body = entry.body
        if body is None:
            body = reads.vm_detail(vm_id=vm_id, viewer=viewer)
            if body is None:
                raise Http404
            entry.store(body)
        return vm_read_response(request.META, body, detail=True)

    def get_view_description(self, html: bool = False) -> str:
        """The browsable API's VM detail page adds a link to the VM's console page (HTML only: the
        JSON answers and the OPTIONS description stay as they are)."""
        description = super().get_view_description(html)
        vm_id = uuid_text(self.kwargs.get("pk", "")) if self.action == "retrieve" else None
        if not html or vm_id is None:
            return description
        link = format_html('<p><a href="{}">Open this VM\'s console</a></p>', console_path(vm_id))
        return SafeString(description + link)

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        classes: dict[str, type[serializers.BaseSerializer[Any]]] = {
            "create": VMCreateSerializer,
            "partial_update": VMUpdateSerializer,
            "batch": VMBatchCreateSerializer,
            "migrate": MigrateRequestSerializer,
        }
        return classes.get(self.action, VMSerializer)

    @extend_schema(request=VMCreateSerializer, responses={202: VMSerializer})
    def create(self, request: Request) -> Response:
        serializer = VMCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        vm = services.vm_create(
            owner=request_user(request), project_id=write_project(request), request=serializer.to_request()
        )
        return Response(vm_data(vm), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=VMUpdateSerializer, responses={200: VMSerializer})
    def partial_update(self, request: Request, pk: str) -> Response:
        """A rename in one statement (:func:`services.vm_rename`); anything else, or a rename that
        statement does not make, through :func:`services.vm_update` (which answers 404, 400, 409)."""
        serializer = VMUpdateSerializer(data=request.data)
        if serializer.is_valid():
            changes = serializer.to_changes()
            if changes.name is not None and not changes.resizes:
                with contextlib.suppress(ValueError):  # not a UUID: get_object answers 404
                    renamed = services.vm_rename(
                        viewer=_viewer(request), vm_id=uuid.UUID(pk), name=changes.name
                    )
                    if renamed is not None:
                        return Response(renamed)
        vm = self.get_object()
        serializer.is_valid(raise_exception=True)
        vm = services.vm_update(vm=vm, changes=serializer.to_changes())
        return Response(vm_data(vm))

    @extend_schema(request=None, responses={202: VMSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        vm = services.vm_delete(vm=self.get_object())
        return Response(vm_data(vm), status=status.HTTP_202_ACCEPTED)

    def _act(self, action_name: VMAction) -> Response:
        vm = services.vm_request_action(vm=self.get_object(), action=action_name)
        return Response(vm_data(vm), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: VMSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        return self._act(VMAction.START)

    @extend_schema(request=None, responses={202: VMSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        return self._act(VMAction.STOP)

    @extend_schema(request=None, responses={202: VMSerializer})
    @action(detail=True, methods=["post"])
    def reboot(self, request: Request, pk: str) -> Response:
        return self._act(VMAction.REBOOT)

    @extend_schema(request=MigrateRequestSerializer, responses={202: MigrationSerializer})
    @action(detail=True, methods=["post"])
    def migrate(self, request: Request, pk: str) -> Response:
        vm = self.get_object()
        serializer = MigrateRequestSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        migration = migration_request(vm=vm, requested_by=request_user(request), **serializer.validated_data)
        return Response(MigrationSerializer(migration).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={201: ConsoleTicketSerializer})
    @action(
        detail=True,
        methods=["post"],
        throttle_classes=[*api_settings.DEFAULT_THROTTLE_CLASSES, ConsoleThrottle],
    )
    def console(self, request: Request, pk: str) -> Response:
        """A single-use ticket (30 s) and the WebSocket URL of the VM's serial console (docs/console.md)."""
        grant = console_open(vm=self.get_object(), user_id=request_user(request).pk)
        return Response(ticket_body(request, grant), status=status.HTTP_201_CREATED)

    @extend_schema(methods=["POST"], request=VMBatchCreateSerializer, responses={202: BatchResponse})
    @extend_schema(methods=["PUT"], request=VMBatchUpdateSerializer, responses={202: BatchResponse})
    @extend_schema(methods=["DELETE"], request=VMBatchDeleteSerializer, responses={202: BatchResponse})
    @action(detail=False, methods=["post", "put", "delete"])
    def batch(self, request: Request) -> Response:
        if request.method == "POST":
            return self._batch_create(request)
        if request.method == "PUT":
            return self._batch_update(request)
        return self._batch_delete(request)

    def audit_detail(self, request: Request, response: Response | None, *, target_id: str) -> dict[str, Any]:
        """A batch's event also lists its VMs: those asked for (update, delete), else those made."""
        detail = super().audit_detail(request, response, target_id=target_id)
        if self.action == "batch":
            sent = sent_fields(request)
            asked = kept_ids(sent.get("ids")) or kept_ids(sent.get("vms"), key="id")
            detail["vms"] = asked or kept_ids(answer_of(response).get("vms"), key="id")
        return detail

    def audit_project_id(self, request: Request, response: Response | None) -> int | None:
        """The project acted in; for staff acting on the whole fleet, the project of the VM acted on
        or made, or of the batch made (so that the project's admins read staff's changes too)."""
        found = super().audit_project_id(request, response)
        if found is not None or not request.user.is_staff:
            return found
        answer = answer_of(response)
        batch = answer.get("batch")
        if isinstance(batch, dict) and "id" in batch:
            return BatchOperation.objects.filter(pk=batch["id"]).values_list("project_id", flat=True).first()
        vm_id = uuid_text(self.kwargs.get("pk") or answer.get("id"))
        return (
            None
            if vm_id is None
            else VM.objects.filter(pk=vm_id).values_list("project_id", flat=True).first()
        )

    def _batch_create(self, request: Request) -> Response:
        _check_list_size(request.data, "vms")
        serializer = VMBatchCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        requests = [services.VMRequest(**item) for item in serializer.validated_data["vms"]]
        batch, vms = services.vm_batch_create(
            owner=request_user(request), project_id=write_project(request), requests=requests
        )
        return _batch_response(batch, vms)

    def _visible_by_id(self, ids: Sequence[Any], key: str) -> Sequence[VM]:
        found = vm_visible_to(_viewer(self.request)).in_bulk(ids)
        missing = {
            f"{key}[{index}]": ["No such VM."] for index, vm_id in enumerate(ids) if vm_id not in found
        }
        if missing:
            raise InvalidInput(next(iter(missing.values()))[0], fields=missing)
        return [found[vm_id] for vm_id in ids]

    def _batch_update(self, request: Request) -> Response:
        _check_list_size(request.data, "vms")
        serializer = VMBatchUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        items = serializer.validated_data["vms"]
        vms = self._visible_by_id([item["id"] for item in items], "vms")
        changes = [
            (vm, services.VMChanges(**{k: v for k, v in item.items() if k != "id"}))
            for vm, item in zip(vms, items, strict=True)
        ]
        batch, updated = services.vm_batch_update(
            owner=request_user(request), project_id=write_project(request), changes=changes
        )
        return _batch_response(batch, updated)

    def _batch_delete(self, request: Request) -> Response:
        _check_list_size(request.data, "ids")
        serializer = VMBatchDeleteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        vms = self._visible_by_id(serializer.validated_data["ids"], "ids")
        batch, deleted = services.vm_batch_delete(
            owner=request_user(request), project_id=write_project(request), vms=vms
        )
        return _batch_response(batch, deleted)


class BatchViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[BatchOperation]):
    """Batch operations of the project the request acts in, with per-item status and counts."""

    serializer_class = BatchSerializer
    permission_classes = (permissions.IsAuthenticated, ProjectRole)

    def get_queryset(self) -> QuerySet[BatchOperation]:
        items = Prefetch("items", queryset=BatchItem.objects.order_by("index"))
        return batch_visible(viewer=_viewer(self.request)).prefetch_related(items)

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        return BatchSummarySerializer if self.action == "list" else BatchSerializer


class NodeViewSet(AuditedView, viewsets.ModelViewSet[Node]):
    """Hypervisor nodes: everyone reads, staff write (nodes normally register through their worker)."""

    audit_actions = model_writes("node")
    audit_fields = NodeSerializer.Meta.fields

    serializer_class = NodeSerializer
    permission_classes = (permissions.IsAuthenticated, IsStaffOrReadOnly)
    queryset = Node.objects.all()
    filterset_fields = ("status", "name")

    def perform_update(self, serializer: serializers.BaseSerializer[Node]) -> None:
        super().perform_update(serializer)
        vm_cache.fleet_changed()  # VM bodies show node names

    def perform_destroy(self, instance: Node) -> None:
        services.node_delete(node=instance)


class MeView(APIView):
    """The caller, their projects and roles, and the quota and usage of the project they act in
    (their personal one unless the request names another)."""

    @extend_schema(responses=MeSerializer)
    def get(self, request: Request) -> Response:
        user = request_user(request)
        project_id = write_project(request)
        entry = vm_cache.me_usage_entry(project_id=project_id)
        if entry.body is not None:
            usage = Usage(**orjson.loads(entry.body))
        else:
            usage = project_usage(project_id=project_id)
            entry.store(orjson.dumps(asdict(usage)))
        return Response(user_profile(user=user, project_id=project_id, usage=usage))
