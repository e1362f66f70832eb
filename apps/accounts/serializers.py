"""Representations and inputs of tokens and users. A token's secret is in one representation only,
:class:`IssuedTokenSerializer`, the answer that makes it."""

from typing import Any

from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from rest_framework import serializers

from apps.core.serializers import StrictInputMixin

from .models import NAME_MAX_LENGTH, ApiToken


class TokenSerializer(serializers.ModelSerializer[ApiToken]):
    expired = serializers.SerializerMethodField(help_text="Past its expires_at: refused.")

    class Meta:
        model = ApiToken
        fields: tuple[str, ...] = ("id", "name", "prefix", "created_at", "expires_at", "read_only", "expired")
        read_only_fields: tuple[str, ...] = fields

    def get_expired(self, token: ApiToken) -> bool:
        return token.is_expired()


class IssuedTokenSerializer(TokenSerializer):
    """A token just made, with its secret (``context["secret"]``): the only answer that has it."""

    token = serializers.SerializerMethodField(
        help_text="The secret, shown only in this answer: send it as 'Authorization: Token <token>'."
    )

    class Meta(TokenSerializer.Meta):
        fields = ("token", *TokenSerializer.Meta.fields)
        read_only_fields = fields

    def get_token(self, token: ApiToken) -> str:
        return str(self.context["secret"])


class NewTokenSerializer(serializers.Serializer[Any]):
    """What a new token may say of itself."""

    name = serializers.CharField(
        max_length=NAME_MAX_LENGTH,
        required=False,
        help_text="Unique among your tokens. Default: token- and the secret's first characters.",
    )
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="In the future; refused from then on. None: never."
    )
    # (The metaclass takes declared fields off the class: this does not shadow Field.read_only.)
    read_only = serializers.BooleanField(  # type: ignore[assignment]
        default=False, help_text="Allows GET, HEAD and OPTIONS only."
    )


class TokenCreateSerializer(StrictInputMixin, NewTokenSerializer):
    name = serializers.CharField(max_length=NAME_MAX_LENGTH, help_text="Unique among your tokens.")


class LoginSerializer(NewTokenSerializer):
    """A username and password, and the new token's optional fields (unknown keys are ignored, as
    ``auth/token/`` always did)."""

    username = serializers.CharField(max_length=150)
    password = serializers.CharField(trim_whitespace=False, write_only=True, style={"input_type": "password"})

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        user = authenticate(
            self.context.get("request"), username=attrs["username"], password=attrs["password"]
        )
        if user is None:  # wrong, or an inactive user
            raise serializers.ValidationError(
                "Unable to log in with provided credentials.", code="authorization"
            )
        attrs["user"] = user
        return attrs


class UserSerializer(serializers.ModelSerializer[User]):
    email = serializers.CharField(read_only=True, help_text="Empty: none given.")  # "" is no valid email

    class Meta:
        model = User
        fields = ("id", "username", "email", "is_staff", "is_active", "date_joined", "last_login")
        read_only_fields = fields


class UserCreateSerializer(StrictInputMixin, serializers.ModelSerializer[User]):
    password = serializers.CharField(
        write_only=True,
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="Checked by the password validators.",
    )

    class Meta:
        model = User
        fields = ("username", "password", "email", "is_staff")


class UserUpdateSerializer(StrictInputMixin, serializers.Serializer[Any]):
    is_active = serializers.BooleanField(
        required=False, help_text="false: the user's tokens are refused at once."
    )
    is_staff = serializers.BooleanField(required=False)
    email = serializers.EmailField(required=False, allow_blank=True)


class PasswordResetSerializer(StrictInputMixin, serializers.Serializer[Any]):
    password = serializers.CharField(
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="Checked by the password validators.",
    )
    revoke_tokens = serializers.BooleanField(default=False, help_text="Also revoke every token of the user.")
