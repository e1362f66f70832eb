"""Input and output shapes of the VM, batch, node and user endpoints."""

from collections.abc import Callable
from typing import Any

from rest_framework import serializers

from apps.core.serializers import NameOrIdField, StrictInputMixin
from apps.images.serializers import UsableImageField
from workers.net.names import MAX_NICS

from . import cloud_init, representation
from .choices import BatchItemStatus
from .models import (
    MAX_DISK_GB,
    MAX_MEMORY_MB,
    MAX_VCPUS,
    VM,
    BatchItem,
    BatchOperation,
    Node,
    name_validator,
)
from .services import VMChanges, VMRequest


# The API's VM, :mod:`.representation`'s: the fields (for the schema and the browsable API) are built
# from the declaration as ``ModelSerializer`` builds a model field's, read-only, through the field's
# ORM path (without the label and help text of a related model's field); the representation is
# :func:`representation.vm_data`. (Comments, not a docstring: drf-spectacular would publish it.)
class VMSerializer(serializers.ModelSerializer[VM]):
    class Meta:
        model = VM
        fields: tuple[str, ...] = ()  # the declaration's (get_fields)

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        built: dict[str, serializers.Field[Any, Any, Any, Any]] = {}
        for declared in representation.VM_FIELDS:
            if declared.api_field is not None:
                built[declared.name] = declared.api_field()
                continue
            field_class, kwargs = self.build_standard_field(
                declared.name, representation.model_field(declared.orm)
            )
            kwargs = dict(self.include_extra_kwargs(kwargs, {"read_only": True}))
            source = declared.orm.replace("__", ".")
            if source != declared.name:
                kwargs["source"] = source
            if declared.relation is not None:
                kwargs.pop("label", None)
                kwargs.pop("help_text", None)
            if representation.nullable(declared.orm):
                kwargs["allow_null"] = True
            built[declared.name] = field_class(**kwargs)
        return built

    def to_representation(self, instance: VM) -> dict[str, Any]:
        return representation.vm_data(instance)


def _name_field(**kwargs: Any) -> serializers.CharField:
    return serializers.CharField(max_length=63, validators=[name_validator], **kwargs)


class VMCreateSerializer(StrictInputMixin, serializers.Serializer[VMRequest]):
    name = _name_field()
    image = UsableImageField()
    vcpus = serializers.IntegerField(min_value=1, max_value=MAX_VCPUS)
    memory_mb = serializers.IntegerField(min_value=64, max_value=MAX_MEMORY_MB)
    disk_gb = serializers.IntegerField(min_value=1, max_value=MAX_DISK_GB)
    node = NameOrIdField(Node, required=False, allow_null=True)
    networks = serializers.ListField(
        child=serializers.CharField(max_length=63),
        required=False,
        max_length=MAX_NICS,
        help_text="Networks (names or ids) of the VM's NICs, in guest order; omitted: the project's "
        "default network (made on first use); empty: no NIC.",
    )
    hostname = serializers.CharField(
        max_length=253,
        required=False,
        help_text="The guest's host name (cloud-init); omitted: the VM's name.",
    )
    ssh_keys = serializers.ListField(
        child=serializers.CharField(max_length=cloud_init.MAX_SSH_KEY_CHARS, trim_whitespace=False),
        required=False,
        max_length=cloud_init.MAX_SSH_KEYS,
        help_text="OpenSSH public keys cloud-init authorises for the image's default user.",
    )
    user_data = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        write_only=True,
        help_text="cloud-init user data (#cloud-config, a script, ...), at most 64 KiB; never shown back.",
    )

    def validate_hostname(self, value: str) -> str:
        return _cloud_init_check(cloud_init.check_hostname, value)

    def validate_ssh_keys(self, value: list[str]) -> list[str]:
        return [_cloud_init_check(cloud_init.check_ssh_key, key) for key in value]

    def validate_user_data(self, value: str) -> str:
        return _cloud_init_check(cloud_init.check_user_data, value) if value else value

    def to_request(self) -> VMRequest:
        return VMRequest(**self.validated_data)


def _cloud_init_check(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except cloud_init.CloudInitError as exc:
        raise serializers.ValidationError(str(exc)) from None


class VMUpdateSerializer(StrictInputMixin, serializers.Serializer[VMChanges]):
    name = _name_field(required=False)
    vcpus = serializers.IntegerField(min_value=1, max_value=MAX_VCPUS, required=False)
    memory_mb = serializers.IntegerField(min_value=64, max_value=MAX_MEMORY_MB, required=False)
    disk_gb = serializers.IntegerField(min_value=1, max_value=MAX_DISK_GB, required=False)

    def to_changes(self) -> VMChanges:
        return VMChanges(**self.validated_data)


class VMBatchUpdateItemSerializer(VMUpdateSerializer):
    id = serializers.UUIDField()


class VMBatchCreateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    vms = VMCreateSerializer(many=True, allow_empty=False)


class VMBatchUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    vms = VMBatchUpdateItemSerializer(many=True, allow_empty=False)


class VMBatchDeleteSerializer(StrictInputMixin, serializers.Serializer[Any]):
    ids = serializers.ListField(child=serializers.UUIDField(), allow_empty=False)


class BatchItemSerializer(serializers.ModelSerializer[BatchItem]):
    vm = serializers.UUIDField(source="vm_id", read_only=True, allow_null=True)

    class Meta:
        model = BatchItem
        fields = ("index", "vm", "status", "error", "updated_at")
        read_only_fields = fields


class BatchSerializer(serializers.ModelSerializer[BatchOperation]):
    counts = serializers.SerializerMethodField()
    items = BatchItemSerializer(many=True, read_only=True)

    class Meta:
        model = BatchOperation
        fields = ("id", "kind", "status", "total", "counts", "created_at", "finished_at", "items")
        read_only_fields = fields

    def get_counts(self, batch: BatchOperation) -> dict[str, int]:
        """Items per status; from ``context["counts"]`` when the caller counted them in the database."""
        counts = {status.value: 0 for status in BatchItemStatus}
        if "counts" in self.context:
            counts.update(self.context["counts"])
            return counts
        for item in batch.items.all():
            counts[item.status] += 1
        return counts


class BatchSummarySerializer(BatchSerializer):
    class Meta(BatchSerializer.Meta):
        fields = ("id", "kind", "status", "total", "counts", "created_at", "finished_at")  # type: ignore[assignment]


class NodeSerializer(StrictInputMixin, serializers.ModelSerializer[Node]):
    free_vcpus = serializers.IntegerField(read_only=True)
    free_memory_mb = serializers.IntegerField(read_only=True)
    free_disk_gb = serializers.IntegerField(read_only=True)

    class Meta:
        model = Node
        fields = (
            "id",
            "name",
            "address",
            "dwcp_address",
            "status",
            "status_reason",
            "vcpus",
            "memory_mb",
            "disk_gb",
            "allocated_vcpus",
            "allocated_memory_mb",
            "allocated_disk_gb",
            "free_vcpus",
            "free_memory_mb",
            "free_disk_gb",
            "hypervisor",
            "networking",
            "vxlan_port",
            "last_heartbeat",
            "created_at",
            "updated_at",
        )
        read_only_fields = (
            "status_reason",
            "allocated_vcpus",
            "allocated_memory_mb",
            "allocated_disk_gb",
            "hypervisor",
            "networking",
            "vxlan_port",
            "last_heartbeat",
            "created_at",
            "updated_at",
        )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        node = Node(**{**self._current(), **attrs})
        node.clean()
        return attrs

    def _current(self) -> dict[str, Any]:
        if self.instance is None:
            return {}
        return {
            field: getattr(self.instance, field)
            for field in (
                "allocated_vcpus",
                "allocated_memory_mb",
                "allocated_disk_gb",
                "vcpus",
                "memory_mb",
                "disk_gb",
            )
        }


class QuotaSerializer(serializers.Serializer[Any]):
    max_vms = serializers.IntegerField()
    max_vcpus = serializers.IntegerField()
    max_memory_mb = serializers.IntegerField()


class UsageSerializer(serializers.Serializer[Any]):
    vms = serializers.IntegerField()
    vcpus = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class ProjectRefSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    name = serializers.CharField()


class MembershipRefSerializer(ProjectRefSerializer):
    role = serializers.CharField()


class MeSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField()
    is_staff = serializers.BooleanField()
    project = ProjectRefSerializer(help_text="The project the request acts in; quota and usage are its.")
    projects = MembershipRefSerializer(many=True, help_text="The caller's projects and roles.")
    quota = QuotaSerializer()
    usage = UsageSerializer()
