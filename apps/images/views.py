"""Image endpoints. Thin: validate, call one service, serialize.

Tenancy as for networks: a request acts in a project (``X-Project`` or ``project``, else the caller's
personal project) and sees its private images, the shared ones and the operators' catalog; staff
naming no project see all; another project's private image is 404. Any role reads; ``member`` and
``admin`` create, upload, change and delete their project's private images; shared images, the
catalog and registrations by path are staff's.

The file of a stored image is sent with ``PUT /images/{id}/file/`` (``application/octet-stream``),
whole or in chunks (``Content-Range: bytes START-END/TOTAL``, START being what the server holds:
``GET``/``HEAD`` on the same URL says it, also as the ``Upload-Offset`` header). The body is read in
chunks of a MiB and written to the store's partial file, never held in memory.
"""

from typing import Any, cast

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.audit.choices import AuditAction
from apps.audit.recording import AuditedView, model_writes
from apps.core.errors import error_body
from apps.projects.acting import acting, write_project
from apps.projects.acting import viewer as acting_viewer
from apps.projects.permissions import ProjectRole
from apps.vms.choices import ImageStatus, ImageVisibility
from apps.vms.models import Image

from . import imports, services
from .selectors import image_visible_to
from .serializers import ImageCreateSerializer, ImageSerializer, ImageUpdateSerializer, UploadOffsetSerializer
from .store import held_bytes

#: What only staff create: registrations by path, and images every user sees.
STAFF_FIELDS = (*services.PATH_FIELDS, "checksum")
OFFSET_HEADER = "Upload-Offset"


class ImageFileParser(BaseParser):
    """An image file as a request's body: handed to the view unread, as the stream it is read from."""

    media_type = "application/octet-stream"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return stream


class ImageViewSet(
    AuditedView,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet[Image],
):
    """Images: the operators' catalog, shared images and the project's private ones. Members create
    a private image and upload its file (or name a URL to import it from); the file is verified
    (qemu-img, no backing or data file, the declared format) and kept by its sha256. An image used
    by a VM cannot be deleted (409)."""

    audit_actions = {**model_writes("image"), "file": {"put": AuditAction.IMAGE_UPLOAD}}
    audit_fields = ("name", "kind", "format", "visibility", "path", "source_url", "sha256")

    serializer_class = ImageSerializer
    permission_classes = (permissions.IsAuthenticated, ProjectRole)
    http_method_names = ("get", "post", "put", "patch", "delete", "head", "options")
    filterset_fields = ("name", "kind", "status", "visibility", "format")

    def get_queryset(self) -> Any:
        return image_visible_to(acting_viewer(self.request))

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        """The input shapes for the browsable API's forms; answers are always ImageSerializer's."""
        inputs: dict[str, type[serializers.BaseSerializer[Any]]] = {
            "create": ImageCreateSerializer,
            "partial_update": ImageUpdateSerializer,
        }
        return inputs.get(self.action, ImageSerializer)

    def audit_action(self, request: Request) -> AuditAction | None:
        """A chunk that leaves the file incomplete is not an event; the upload's end (or refusal) is."""
        return None if getattr(self, "_chunk_only", False) else super().audit_action(request)

    def _writable(self, request: Request) -> Image:
        """The image of the URL, if the caller may change it: staff, or the acting project's own
        private image (another project's is not even seen: 404)."""
        image = self.get_object()
        if request.user.is_staff:
            return image
        if services.is_shared(image) or image.project_id != acting(request).project_id:
            raise PermissionDenied("Only staff change shared images and the operators' catalog.")
        return image

    @extend_schema(request=ImageCreateSerializer, responses={201: ImageSerializer})
    def create(self, request: Request) -> Response:
        serializer = ImageCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        shared = data.get("visibility") == ImageVisibility.SHARED
        by_path = any(data.get(field) for field in STAFF_FIELDS)
        if not request.user.is_staff and (shared or by_path):
            raise PermissionDenied("Only staff create shared images or register images by path.")
        if by_path:
            data.setdefault("visibility", ImageVisibility.SHARED)
        data.setdefault("visibility", ImageVisibility.PRIVATE)
        catalog = data["visibility"] == ImageVisibility.SHARED
        image = services.image_create(project_id=None if catalog else write_project(request), **data)
        return Response(ImageSerializer(image).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ImageUpdateSerializer, responses={200: ImageSerializer})
    def partial_update(self, request: Request, pk: str) -> Response:
        """Rename an image or change its metadata (its file never changes)."""
        image = self._writable(request)
        serializer = ImageUpdateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if "visibility" in serializer.validated_data and not request.user.is_staff:
            raise PermissionDenied("Only staff change an image's visibility.")
        image = services.image_update(image=image, **serializer.validated_data)
        return Response(ImageSerializer(image).data)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.image_delete(image=self._writable(request))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        methods=["PUT"],
        summary="Upload the image's file, whole or a chunk of it",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(
                "Content-Range",
                str,
                OpenApiParameter.HEADER,
                description="bytes START-END/TOTAL: a chunk, START being what the server holds.",
            )
        ],
        responses={
            200: ImageSerializer,
            409: OpenApiResponse(description="Another upload runs, or START is not the held offset."),
            413: OpenApiResponse(description="Above IMAGE_MAX_SIZE_GB."),
        },
    )
    @extend_schema(
        methods=["GET"], summary="How much of the file the server holds", responses=UploadOffsetSerializer
    )
    @action(detail=True, methods=["get", "put"], url_path="file", parser_classes=[ImageFileParser])
    def file(self, request: Request, pk: str) -> Response | HttpResponse:
        if request.method != "PUT":
            image = self.get_object()
            held = held_bytes(image.pk) if image.status != ImageStatus.READY else image.size_bytes
            offset = {"received_bytes": held, "size": image.size_bytes or None, "status": image.status}
            return Response(offset, headers={OFFSET_HEADER: str(held)})
        image = self._writable(request)
        length = request.META.get("CONTENT_LENGTH") or "0"
        if request.META.get("HTTP_TRANSFER_ENCODING") or not length.isdigit():
            message = "Send the file with a Content-Length (chunked bodies are not taken)."
            return Response(error_body("length_required", message), status=status.HTTP_411_LENGTH_REQUIRED)
        chunk = imports.chunk_of(request.headers.get("Content-Range"), int(length))
        body = cast("imports.Readable", request.data)  # the stream, by ImageFileParser
        try:
            with imports.import_lock(image.pk):
                image = imports.receive(image, body, chunk)
        except imports.OffsetMismatch as mismatch:
            answer = error_body(mismatch.code, mismatch.message) | {"received_bytes": mismatch.held}
            return Response(answer, status=mismatch.status, headers={OFFSET_HEADER: str(mismatch.held)})
        self._chunk_only = image.status != ImageStatus.READY
        held = image.size_bytes if image.status == ImageStatus.READY else held_bytes(image.pk)
        return Response(ImageSerializer(image).data, headers={OFFSET_HEADER: str(held)})
