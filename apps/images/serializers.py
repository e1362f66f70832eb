"""Input and output shapes of the image endpoints."""

from typing import Any, cast

from rest_framework import serializers

from apps.core.serializers import NameOrIdField, StrictInputMixin
from apps.projects.acting import acting
from apps.vms.choices import ImageFormat, ImageKind, ImageStatus, ImageVisibility
from apps.vms.models import Image, name_validator

from .imports import received_bytes


class ImageSerializer(serializers.ModelSerializer[Image]):
    project = serializers.CharField(source="project.name", read_only=True, allow_null=True, default=None)
    received_bytes = serializers.SerializerMethodField(
        help_text="Bytes of the file the store holds while it is uploaded or imported (else null)."
    )

    class Meta:
        model = Image
        fields = (
            "id",
            "name",
            "project",
            "visibility",
            "status",
            "status_reason",
            "kind",
            "format",
            "sha256",
            "size_bytes",
            "virtual_size_bytes",
            "received_bytes",
            "checksum",
            "os_type",
            "os_version",
            "min_disk_gb",
            "min_memory_mb",
            "source_url",
            "path",
            "kernel_path",
            "initrd_path",
            "cmdline",
            "created_at",
        )
        read_only_fields = fields

    def get_received_bytes(self, image: Image) -> int | None:
        return received_bytes(image)


class _MetadataSerializer(StrictInputMixin, serializers.Serializer[Any]):
    """The fields a create and an update share."""

    os_type = serializers.CharField(max_length=32, required=False, allow_blank=True, help_text="e.g. linux")
    os_version = serializers.CharField(max_length=32, required=False, allow_blank=True, help_text="e.g. 12")
    min_disk_gb = serializers.IntegerField(min_value=0, max_value=1 << 20, required=False)
    min_memory_mb = serializers.IntegerField(min_value=0, max_value=1 << 30, required=False)


class ImageCreateSerializer(_MetadataSerializer):
    name = serializers.CharField(max_length=63, validators=[name_validator])
    format = serializers.ChoiceField(
        choices=ImageFormat.choices,
        required=False,
        help_text="The file's format (required for stored images).",
    )
    visibility = serializers.ChoiceField(
        choices=ImageVisibility.choices,
        required=False,
        help_text="private (the request's project; default) or shared with every user (staff only).",
    )
    sha256 = serializers.CharField(
        max_length=64, required=False, allow_blank=True, help_text="The sha256 the file must have (hex)."
    )
    source_url = serializers.CharField(
        max_length=2048, required=False, allow_blank=True, help_text="Import the file from this http(s) URL."
    )
    kind = serializers.ChoiceField(
        choices=ImageKind.choices, required=False, help_text="Staff's path images."
    )
    path = serializers.CharField(
        max_length=1024, required=False, allow_blank=True, help_text="A base disk on every node (staff only)."
    )
    kernel_path = serializers.CharField(max_length=1024, required=False, allow_blank=True)
    initrd_path = serializers.CharField(max_length=1024, required=False, allow_blank=True)
    cmdline = serializers.CharField(max_length=1024, required=False, allow_blank=True)
    checksum = serializers.CharField(max_length=80, required=False, allow_blank=True)


class ImageUpdateSerializer(_MetadataSerializer):
    name = serializers.CharField(max_length=63, validators=[name_validator], required=False)
    visibility = serializers.ChoiceField(choices=ImageVisibility.choices, required=False)


class UploadOffsetSerializer(serializers.Serializer[Any]):
    """Where an upload stands: resume with ``Content-Range: bytes <received_bytes>-.../<size>``."""

    received_bytes = serializers.IntegerField()
    size = serializers.IntegerField(allow_null=True, help_text="The announced size of the file.")
    status = serializers.CharField()


class UsableImageField(NameOrIdField):
    """A VM's image, by name or id: one the request's project sees (another project's private image
    is unknown, as in the image endpoints) and ``ready`` (no query beyond the look-up)."""

    default_error_messages = {
        **NameOrIdField.default_error_messages,
        "not_ready": "Image {name} is {status}, not ready: its file must be imported first.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(Image, **kwargs)

    def to_internal_value(self, data: Any) -> Image:
        image = cast("Image", super().to_internal_value(data))
        if not self._seen(image):
            self.fail("not_found", model=Image._meta.verbose_name, value=data)
        if image.status != ImageStatus.READY:
            self.fail("not_ready", name=image.name, status=image.status)
        return image

    def _seen(self, image: Image) -> bool:
        """Whether the request sees ``image`` (:func:`apps.images.selectors.image_visible_to`'s rule)."""
        request = self.context.get("request")
        if image.project_id is None or image.visibility == ImageVisibility.SHARED:
            return True
        return request is None or request.user.is_staff or image.project_id == acting(request).project_id
