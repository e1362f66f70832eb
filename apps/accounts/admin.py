"""Admin pages of tokens (who holds which, when they expire; revoking them), and users with theirs.
No secret is ever shown (the database has none): tokens are made through the API, which shows a
secret once."""

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import ApiToken
from .services import token_revoke

TOKEN_FIELDS = ("name", "user", "prefix", "created_at", "expires_at", "read_only")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = TOKEN_FIELDS
    list_filter = ("read_only", "created_at", "expires_at")
    search_fields = ("name", "prefix", "user__username")
    list_select_related = ("user",)
    readonly_fields = TOKEN_FIELDS
    actions = ("revoke",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        found = super().get_actions(request)
        found.pop("delete_selected", None)  # "revoke" says what deleting a token means
        return found

    @admin.action(description="Revoke the selected tokens", permissions=["delete"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = 0
        for token in queryset:
            token_revoke(token=token)
            count += 1
        self.message_user(
            request, f"Revoked {count} token(s): refused from the next request on.", messages.SUCCESS
        )


class ApiTokenInline(admin.TabularInline[ApiToken, Any]):
    """A user's tokens on their admin page; deleting one revokes it."""

    model = ApiToken
    fields = ("name", "prefix", "created_at", "expires_at", "read_only")
    readonly_fields = fields
    extra = 0
    can_delete = True
    verbose_name_plural = "API tokens (delete one to revoke it)"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


admin.site.unregister(User)


@admin.register(User)
class NovaCronUserAdmin(UserAdmin):
    """Django's user page with the user's API tokens (their projects: the projects' pages)."""

    inlines = (ApiTokenInline,)
