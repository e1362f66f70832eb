"""The projects API's representations and inputs (strict: an unknown key is a 400)."""

from typing import Any, Final

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers

from apps.core.serializers import StrictInputMixin
from apps.vms.serializers import UsageSerializer

from .models import Membership, Project, Role, name_validator
from .services import QUOTA_LIMIT_MAX


class ProjectSerializer(serializers.ModelSerializer[Project]):
    role = serializers.ChoiceField(
        Role.choices, read_only=True, allow_null=True, help_text="The caller's role (staff: null if none)."
    )

    class Meta:
        model = Project
        fields = ("id", "name", "description", "personal_of", "role", "created_at")
        read_only_fields = fields


class ProjectCreateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    name = serializers.CharField(max_length=63, validators=[name_validator])
    description = serializers.CharField(max_length=500, allow_blank=True, required=False, default="")


class ProjectUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    name = serializers.CharField(max_length=63, validators=[name_validator], required=False)
    description = serializers.CharField(max_length=500, allow_blank=True, required=False)


class MembershipSerializer(serializers.ModelSerializer[Membership]):
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Membership
        fields = ("user_id", "username", "role", "created_at")
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.STR)
class UserRefField(serializers.Field):
    """A user given by username, or by id (an integer, or digits)."""

    default_error_messages = {"invalid": "Give the user's username or id."}

    def to_internal_value(self, data: Any) -> str:
        if (
            isinstance(data, bool)
            or not isinstance(data, (str, int))
            or not str(data)
            or len(str(data)) > 150
        ):
            self.fail("invalid")
        return str(data)

    def to_representation(self, value: Any) -> str:
        return str(value)


class MembershipCreateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    user = UserRefField(help_text="Username or id of an active user.")
    role = serializers.ChoiceField(Role.choices, default=Role.MEMBER)


class MembershipUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    role = serializers.ChoiceField(Role.choices)


def _limit(name: str, what: str, **kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=0, max_value=QUOTA_LIMIT_MAX[name], help_text=what, **kwargs)


class ProjectQuotaLimitsSerializer(StrictInputMixin, serializers.Serializer[Any]):
    """A project's limits (PUT: all of them, PATCH: some); a limit below the current usage is
    allowed and refuses the project's next creates."""

    max_vms = _limit("max_vms", "VMs that are not deleted.")
    max_vcpus = _limit("max_vcpus", "vCPUs of those VMs.")
    max_memory_mb = _limit("max_memory_mb", "Memory of those VMs, in MiB.")
    # Optional even in a PUT: clients written before networks set the three limits above.
    max_networks = _limit("max_networks", "Networks the project owns.", required=False)


class ProjectUsageSerializer(UsageSerializer):
    networks = serializers.IntegerField(help_text="Networks the project owns.")


class ProjectQuotaSerializer(serializers.Serializer[Any]):
    limits = ProjectQuotaLimitsSerializer()
    usage = ProjectUsageSerializer(
        help_text="What the project's VMs that are not deleted, and its networks, use."
    )


class ErrorDetailSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="Machine-readable: invalid, not_found, conflict...")
    message = serializers.CharField(help_text="What went wrong, for a person.")
    fields = serializers.DictField(  # type: ignore[assignment]  # DRF takes declared fields off the class
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Bad input: the messages of each field.",
    )


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error of the API (``apps.core.errors``)."""

    error = ErrorDetailSerializer()


_ERROR_WHEN: Final = {
    400: "Bad input; `fields` names each field.",
    401: "No or bad credentials.",
    403: "The caller's role does not allow this.",
    404: "No such project (or member), or one the caller is not a member of.",
    409: "The project's state does not allow it (its last admin, a personal project, VMs left...).",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """The schema's error answers of an operation, by status (401 always)."""
    return {
        status: OpenApiResponse(ErrorSerializer, description=_ERROR_WHEN[status])
        for status in sorted({401, *statuses})
    }
