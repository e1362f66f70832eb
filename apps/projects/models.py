"""Projects own the fleet's tenant resources; users are members of them with a role.

Invariants: a user has at most one personal project (``personal_of``), named ``~<username>``
(names of other projects cannot start with ``~``), created on first use; a user has at most one
membership per project; a project's quota lives on its row, whose lock (FOR NO KEY UPDATE)
serializes the project's quota-checked writes.
"""

from typing import Final

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from apps.core.conf import novacron_setting

PERSONAL_PREFIX: Final = "~"
# Team projects: a lower-case name of letters, digits, '-', '_' and '.', starting with a letter or digit.
name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]{0,62}$",
    "Use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or a digit.",
)


class Role(models.TextChoices):
    """What a member may do: ``reader`` sees, ``member`` also acts, ``admin`` also manages members
    and reads the project's audit trail."""

    READER = "reader"
    MEMBER = "member"
    ADMIN = "admin"


ROLE_RANK: Final = {Role.READER: 1, Role.MEMBER: 2, Role.ADMIN: 3}


def role_allows(role: str | None, needed: Role) -> bool:
    """Whether ``role`` (None: not a member) is ``needed`` or above."""
    return role is not None and ROLE_RANK[Role(role)] >= ROLE_RANK[needed]


def default_max_networks() -> int:
    """A project made without saying (rows of code written before networks): the default quota's."""
    return int(novacron_setting("DEFAULT_QUOTA")["max_networks"])


class Project(models.Model):
    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=500, blank=True)
    personal_of = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="personal_project",
        help_text="The user whose personal project this is (made on their first use).",
    )
    max_vms = models.PositiveIntegerField()
    max_vcpus = models.PositiveIntegerField()
    max_memory_mb = models.PositiveBigIntegerField()
    max_networks = models.PositiveIntegerField(default=default_max_networks)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "projects"
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def default_quota() -> dict[str, int]:
        """The limits of a new project (``NOVACRON["DEFAULT_QUOTA"]``)."""
        return dict(novacron_setting("DEFAULT_QUOTA"))


class Membership(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "project_memberships"
        ordering = ("project", "user")
        constraints = [models.UniqueConstraint(fields=("project", "user"), name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} ({self.role})"
