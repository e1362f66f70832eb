"""Django admin of projects: their quotas (editable, within ``QUOTA_LIMIT_MAX``) and members (an
inline), and a read-only list of every membership.

The admin keeps the API's invariants: a project keeps an admin, a personal project its owner as
admin and its name, and is never deleted here; a project with VMs is not deleted (the admin's own
check of protected rows). Every membership change drops the changed users' token memos, as the
API's services do. Project, quota and membership changes made here are in the audit trail, with
``"via": "admin"``.
"""

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest

from apps.audit.choices import AuditAction
from apps.audit.services import audit_admin

from .models import Membership, Project, Role
from .services import QUOTA_LIMIT_MAX, memberships_changed


class ProjectAdminForm(forms.ModelForm[Project]):
    class Meta:
        model = Project
        fields = ("name", "description", *QUOTA_LIMIT_MAX)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for field, most in QUOTA_LIMIT_MAX.items():
            value = cleaned.get(field)
            if value is not None and value > most:
                self.add_error(field, f"At most {most}.")
        return cleaned


class MembershipInlineFormSet(BaseInlineFormSet[Membership, Project, forms.ModelForm[Membership]]):
    """Refuses leaving a project without an admin, or a personal project without its owner as admin."""

    def clean(self) -> None:
        super().clean()
        kept = [
            form.cleaned_data
            for form in self.forms
            if getattr(form, "cleaned_data", None) and not form.cleaned_data.get("DELETE")
        ]
        admins = {data["user"].pk for data in kept if data.get("user") and data.get("role") == Role.ADMIN}
        owner = self.instance.personal_of_id
        if owner is not None and owner not in admins:
            raise ValidationError("The owner of a personal project stays its admin.")
        if not admins:
            raise ValidationError("A project needs at least one admin.")


class MembershipInline(admin.TabularInline[Membership, Project]):
    model = Membership
    formset = MembershipInlineFormSet
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    autocomplete_fields = ("user",)
    extra = 0


class ProjectKindFilter(admin.SimpleListFilter):
    title = "kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("personal", "personal"), ("team", "team")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Project]) -> QuerySet[Project]:
        if self.value() in ("personal", "team"):
            return queryset.filter(personal_of__isnull=self.value() == "team")
        return queryset


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin[Project]):
    form = ProjectAdminForm
    fields = ("name", "description", *QUOTA_LIMIT_MAX, "personal_of", "created_at")
    list_display = ("name", "personal_of", *QUOTA_LIMIT_MAX, "created_at")
    list_editable = tuple(QUOTA_LIMIT_MAX)
    list_filter = (ProjectKindFilter, "created_at")
    list_select_related = ("personal_of",)
    search_fields = ("name",)
    inlines = (MembershipInline,)

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        # The list's editable quotas are checked as on the change page (Django's default is a bare form).
        return super().get_changelist_form(request, form=ProjectAdminForm, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Project | None = None) -> tuple[str, ...]:
        personal = obj is not None and obj.personal_of_id is not None
        return ("personal_of", "created_at", *(("name",) if personal else ()))

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {**Project.default_quota(), **super().get_changeform_initial_data(request)}

    def has_delete_permission(self, request: HttpRequest, obj: Project | None = None) -> bool:
        if obj is not None and obj.personal_of_id is not None:
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: Project, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        changed = set(form.changed_data)
        if not change:
            audit_admin(request, AuditAction.PROJECT_CREATE, target_id=obj.pk, project_id=obj.pk)
        if change and changed & {"name", "description"}:
            detail = {"fields": sorted(changed & {"name", "description"})}
            audit_admin(
                request, AuditAction.PROJECT_UPDATE, target_id=obj.pk, project_id=obj.pk, detail=detail
            )
        if change and changed & set(QUOTA_LIMIT_MAX):
            values = {name: getattr(obj, name) for name in QUOTA_LIMIT_MAX}
            audit_admin(
                request,
                AuditAction.QUOTA_UPDATE,
                target_id=obj.pk,
                project_id=obj.pk,
                detail={"values": values},
            )

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        before = dict(formset.instance.memberships.values_list("user_id", "role")) if change else {}
        super().save_formset(request, form, formset, change)
        after = dict(formset.instance.memberships.values_list("user_id", "role"))
        changed = [user for user in before.keys() | after.keys() if before.get(user) != after.get(user)]
        memberships_changed(changed)
        for user in sorted(changed):
            action = (
                AuditAction.MEMBER_ADD
                if user not in before
                else AuditAction.MEMBER_REMOVE
                if user not in after
                else AuditAction.MEMBER_UPDATE
            )
            role = {"role": after[user]} if user in after else {}
            project = formset.instance.pk
            audit_admin(request, action, target_id=user, project_id=project, detail={"values": role})

    def delete_model(self, request: HttpRequest, obj: Project) -> None:
        members = list(obj.memberships.values_list("user_id", flat=True))
        project_id = obj.pk
        super().delete_model(request, obj)
        memberships_changed(members)
        audit_admin(request, AuditAction.PROJECT_DELETE, target_id=project_id, project_id=project_id)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # Projects are deleted one at a time, on their page (where a personal one cannot be).
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin[Membership]):
    """Every membership, to find who is where; changes are made on the project's page."""

    list_display = ("project", "user", "role", "created_at")
    list_filter = ("role",)
    list_select_related = ("project", "user")
    search_fields = ("project__name", "user__username")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return False
