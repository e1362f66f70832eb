"""NovaCron's own options, under one dict read through ``apps.core.conf.novacron_setting``."""

from .django import VAR_DIR
from .env import env, env_int

DWCP_SECRET = env(
    "DWCP_SECRET", "", help="Shared HMAC key for DWCP transfer tickets (control plane and every node)."
)


def _no_convergence_policy(raw: str) -> str:
    """``keep``, ``cancel`` or ``force_complete_after:N`` (N >= 1), as ``MIGRATION_ON_NO_CONVERGENCE``."""
    policy, _, passes = raw.strip().partition(":")
    if policy in ("keep", "cancel") and not passes:
        return policy
    if policy == "force_complete_after" and passes.isdigit() and int(passes) >= 1:
        return f"{policy}:{int(passes)}"
    raise ValueError(f"expected keep, cancel or force_complete_after:N (N >= 1), got {raw!r}")


NOVACRON = {
    "DEFAULT_QUOTA": {
        "max_vms": env_int("QUOTA_MAX_VMS", 100, help="Quota of a new project: VMs (not deleted)."),
        "max_vcpus": env_int("QUOTA_MAX_VCPUS", 400, help="Quota of a new project: vCPUs."),
        "max_memory_mb": env_int(
            "QUOTA_MAX_MEMORY_MB", 819200, help="Quota of a new project: memory in MiB."
        ),
        "max_networks": env_int("QUOTA_MAX_NETWORKS", 10, help="Quota of a new project: networks."),
    },
    "BATCH_MAX_ITEMS": 1000,
    "IMAGE_STORE_DIR": env(
        "IMAGE_STORE_DIR",
        str(VAR_DIR / "images" / "store"),
        help="The control host's image store (files named by sha256).",
    ),
    "IMAGE_MAX_SIZE_GB": env_int(
        "IMAGE_MAX_SIZE_GB", 64, help="Largest image file the store takes (upload or URL), in GiB."
    ),
    "IMAGE_MAX_VIRTUAL_SIZE_GB": env_int(
        "IMAGE_MAX_VIRTUAL_SIZE_GB", 2048, help="Largest virtual disk size of an imported image, in GiB."
    ),
    "IMAGE_URL_ATTEMPTS": env_int(
        "IMAGE_URL_ATTEMPTS", 5, help="Tries of a URL import (resumed with a Range request) before it fails."
    ),
    "IMAGE_FETCH_STALL_TIMEOUT": env_int(
        "IMAGE_FETCH_STALL_TIMEOUT",
        120,
        help="Seconds a fetch of an image to a node may go without a report before it is restarted "
        "from the next source (senders report at least every 30 s).",
    ),
    "CPU_ALLOCATION_RATIO": env(
        "CPU_ALLOCATION_RATIO", 4.0, cast=float, help="vCPUs offered per host CPU when a node registers."
    ),
    "RAM_ALLOCATION_RATIO": env(
        "RAM_ALLOCATION_RATIO", 1.0, cast=float, help="Memory offered per MiB of host memory at registration."
    ),
    "NODE_HEARTBEAT_TIMEOUT": env_int(
        "NODE_HEARTBEAT_TIMEOUT", 30, help="Seconds without a heartbeat before a node is marked down."
    ),
    "MIGRATION_MAX_OUTGOING": env_int(
        "MIGRATION_MAX_OUTGOING", 2, help="Concurrent outgoing migrations per node."
    ),
    "MIGRATION_MAX_INCOMING": env_int(
        "MIGRATION_MAX_INCOMING", 2, help="Concurrent incoming migrations per node."
    ),
    "MIGRATION_DOWNTIME_LIMIT_MS": env_int(
        "MIGRATION_DOWNTIME_LIMIT_MS",
        100,
        help="Live migration: the longest pause QEMU may plan for the switch.",
    ),
    "MIGRATION_ON_NO_CONVERGENCE": env(
        "MIGRATION_ON_NO_CONVERGENCE",
        "keep",
        cast=_no_convergence_policy,
        help="Live migration whose pre-copy does not converge, unless its request says otherwise: keep "
        "(auto-converge, keep trying), force_complete_after:N (force-complete from RAM pass N) or cancel.",
    ),
    "MIGRATION_STREAMS": env_int(
        "MIGRATION_STREAMS", 4, help="DWCP parallel TCP streams per migration transfer."
    ),
    "MIGRATION_TICKET_TTL": env_int(
        "MIGRATION_TICKET_TTL", 300, help="Seconds a DWCP transfer ticket is valid."
    ),
    "MIGRATION_STALL_TIMEOUT": env_int(
        "MIGRATION_STALL_TIMEOUT", 120, help="Seconds without progress before the watchdog fails a migration."
    ),
    "MIGRATION_LINK_OUTAGE_SECONDS": env_int(
        "MIGRATION_LINK_OUTAGE_SECONDS",
        120,
        help="Seconds a migration whose link between the nodes is cut (its progress shows link:"
        " reconnecting) is not failed by the watchdog; keep it equal to the nodes' NODE_LINK_OUTAGE_SECONDS.",
    ),
    "MIGRATION_SWITCH_UNKNOWN_TIMEOUT": env_int(
        "MIGRATION_SWITCH_UNKNOWN_TIMEOUT",
        300,
        help="Seconds a switching migration waits for a known answer from its destination before an"
        " operator is asked (it is never rolled back on an unknown answer).",
    ),
    "MIGRATION_WEBHOOK_URL": env(
        "MIGRATION_WEBHOOK_URL", "", help="URL that receives a JSON POST on every migration state change."
    ),
    "MIGRATION_WEBHOOK_SECRET": env(
        "MIGRATION_WEBHOOK_SECRET",
        "",
        help="HMAC-SHA256 key signing migration webhooks (X-NovaCron-Signature).",
    ),
    "ADMIN_USERNAME": "admin",
    "AUDIT_RETENTION_DAYS": env_int(
        "AUDIT_RETENTION_DAYS", 365, help="Days audit events are kept (deleted in batches by beat)."
    ),
}
