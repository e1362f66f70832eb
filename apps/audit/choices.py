"""The audit trail's vocabulary: every action an event may name, and the outcomes.

An action is ``<target type>.<verb>``: the part before the dot is the kind of object the event's
``target_id`` names (``vm.migrate`` targets the VM; the migration it made is in the detail). A new
audited endpoint adds its action here first; the API's ``?action=`` filter accepts exactly these
names and their ``<target type>.`` prefixes.
"""

from django.db import models


class AuditAction(models.TextChoices):
    VM_CREATE = "vm.create"
    VM_UPDATE = "vm.update"
    VM_DELETE = "vm.delete"
    VM_START = "vm.start"
    VM_STOP = "vm.stop"
    VM_REBOOT = "vm.reboot"
    VM_MIGRATE = "vm.migrate"
    VM_CONSOLE = "vm.console"  # a console ticket issued (docs/console.md)
    BATCH_CREATE = "batch.create"
    BATCH_UPDATE = "batch.update"
    BATCH_DELETE = "batch.delete"
    MIGRATION_UPDATE = "migration.update"
    MIGRATION_CANCEL = "migration.cancel"
    MIGRATION_FORCE_COMPLETE = "migration.force_complete"
    NODE_CREATE = "node.create"
    NODE_UPDATE = "node.update"
    NODE_DELETE = "node.delete"
    NODE_DRAIN = "node.drain"
    IMAGE_CREATE = "image.create"
    IMAGE_UPDATE = "image.update"
    IMAGE_DELETE = "image.delete"
    IMAGE_UPLOAD = "image.upload"  # a file's upload or URL import ended (stored or refused)
    NETWORK_CREATE = "network.create"
    NETWORK_UPDATE = "network.update"
    NETWORK_DELETE = "network.delete"
    PROJECT_CREATE = "project.create"
    PROJECT_UPDATE = "project.update"
    PROJECT_DELETE = "project.delete"
    MEMBER_ADD = "member.add"
    MEMBER_UPDATE = "member.update"
    MEMBER_REMOVE = "member.remove"
    QUOTA_UPDATE = "quota.update"
    TOKEN_CREATE = "token.create"  # noqa: S105 (action names, not secrets)
    TOKEN_REVOKE = "token.revoke"  # noqa: S105
    USER_CREATE = "user.create"
    USER_UPDATE = "user.update"
    USER_PASSWORD = "user.password"  # noqa: S105
    ALERT_RULE_CREATE = "alert_rule.create"
    ALERT_RULE_UPDATE = "alert_rule.update"
    ALERT_RULE_DELETE = "alert_rule.delete"
    ALERT_ACKNOWLEDGE = "alert.acknowledge"

    @property
    def target_type(self) -> str:
        """The kind of object the action's events target: ``vm`` for ``vm.migrate``."""
        return self.value.partition(".")[0]


#: The prefixes ``?action=`` takes besides whole names: ``vm.``, ``member.``...
ACTION_PREFIXES = frozenset(f"{action.target_type}." for action in AuditAction)


class Outcome(models.TextChoices):
    """How the request ended, by its status: 1xx-3xx ok, 4xx refused, 5xx failed."""

    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"

    @classmethod
    def of_status(cls, status: int) -> "Outcome":
        if status >= 500:
            return cls.FAILED
        return cls.REFUSED if status >= 400 else cls.OK
