"""The seed report's indexes exist on PostgreSQL, and the VM list queries use them at 100k rows."""

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection

from apps.projects.services import personal_project
from apps.vms.selectors import vm_list
from tests.conftest import viewer_of

pytestmark = pytest.mark.django_db

EXPECTED = {
    "vms_state_live_idx": ("vms", "(state)", "WHERE"),
    "vms_project_created_idx": ("vms", "(project_id, created_at DESC)", None),
    "vms_created_idx": ("vms", "(created_at DESC)", None),
    "vms_error_created_idx": (
        "vms",
        "(created_at DESC, id DESC) WHERE ((state)::text = 'error'::text)",
        None,
    ),
    "vms_project_usage_idx": ("vms", "(project_id) INCLUDE (vcpus, memory_mb)", "WHERE"),
    "batches_project_created_idx": ("batch_operations", "(project_id, created_at DESC)", None),
    "migrations_status_idx": ("migrations", "(status)", None),
    "migrations_nodes_idx": ("migrations", "(source_node_id, dest_node_id)", None),
    "api_logs_timestamp_idx": ("api_logs", '("timestamp" DESC)', None),
    "api_logs_user_endpoint_idx": ("api_logs", "(user_id, endpoint)", None),
    "metrics_timestamp_idx": ("metrics", '("timestamp" DESC)', None),
    "alerts_status_severity_idx": ("alerts", "(status, severity)", None),
}


def test_seed_indexes_exist_and_are_valid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, tablename, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        found = {name: (table, definition) for name, table, definition in cursor.fetchall()}
        cursor.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid"
        )
        invalid = {row[0] for row in cursor.fetchall()}
    for name, (table, columns, where) in EXPECTED.items():
        assert name in found, f"missing index {name}"
        assert found[name][0] == table
        assert columns in found[name][1], found[name][1]
        if where:
            assert "WHERE" in found[name][1] and "deleted" in found[name][1]
        assert name not in invalid


def _copy_vms(owners: list[Any], image_id: int, node_id: int, count: int) -> None:
    """``count`` VMs round-robin over ``owners``, each in the owner's personal project."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    buffer = io.StringIO()
    projects = [personal_project(owner).pk for owner in owners]
    for index in range(count):
        state = "deleted" if index % 10 == 0 else ("running" if index % 3 else "stopped")
        created = (start + timedelta(seconds=index)).isoformat()
        owner, project = owners[index % len(owners)].pk, projects[index % len(owners)]
        buffer.write(
            f"{uuid.uuid4()}\tvm-{index}\t{owner}\t{project}\t{node_id}\t{image_id}\t{state}\t\t\t1\t256\t1\t{created}\t{created}\t\\N\t"
            f"vm-{index}\t[]\t\n"
        )
    buffer.seek(0)
    columns = (
        "id, name, owner_id, project_id, node_id, image_id, state, state_reason, pending_action, vcpus, "
        "memory_mb, disk_gb, created_at, updated_at, deleted_at, hostname, ssh_keys, user_data"
    )
    with connection.cursor() as cursor:
        with cursor.copy(f"COPY vms ({columns}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())
        cursor.execute("ANALYZE vms")


def _plan(queryset) -> str:
    return queryset.explain()


def test_vm_list_queries_use_an_index_at_100k_rows(make_user, make_node, make_image):
    users = [make_user(f"tenant{i}") for i in range(50)]
    staff = make_user("ops", staff=True)
    node, image = make_node("n1"), make_image()
    _copy_vms(users, image.pk, node.pk, 100_000)
    page = slice(0, 51)
    tenant, fleet = viewer_of(users[0]), viewer_of(staff)
    plans = {
        "tenant list": _plan(vm_list(viewer=tenant).order_by("-created_at", "-id")[page]),
        "staff list": _plan(vm_list(viewer=fleet).order_by("-created_at", "-id")[page]),
        "tenant by state": _plan(
            vm_list(viewer=tenant, state="stopped").order_by("-created_at", "-id")[page]
        ),
        "staff by state": _plan(vm_list(viewer=fleet, state="stopped").order_by("-created_at", "-id")[page]),
    }
    for label, plan in plans.items():
        assert "Index" in plan, f"{label} does not use an index:\n{plan}"
        assert "Seq Scan on vms" not in plan, f"{label} scans the table:\n{plan}"


def test_the_staff_list_of_errors_walks_its_own_index_when_errors_are_old(make_user, make_node, make_image):
    """The fixed SQL of the staff list of errors (reads.page_sql) reads its page from vms_error_created_idx,
    also when every error VM is older than the others (where vms_created_idx would walk past all of
    them: PostgreSQL preferred that with an index on (state, created_at, id), measured at 1M VMs)."""
    from apps.vms.reads import PageShape, page_window

    owner = make_user("tenant")
    node, image = make_node("n1"), make_image()
    _copy_vms([owner], image.pk, node.pk, 50_000)
    with connection.cursor() as cursor:  # the oldest 1000 VMs are the only ones in "error"
        oldest = datetime(2026, 1, 1, 0, 16, 40, tzinfo=UTC)
        cursor.execute("UPDATE vms SET state = 'error' WHERE created_at < %s", [oldest])
        cursor.execute("ANALYZE vms")
        for reverse in (False, True):
            sql = page_window(
                PageShape(fleet=True, state="error", position="", reverse=reverse), limit=51, offset=0
            )
            cursor.execute(f"EXPLAIN {sql}")
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "vms_error_created_idx" in plan and "Sort" not in plan, plan


@pytest.mark.django_db(transaction=True)  # VACUUM runs outside a transaction
def test_a_projects_usage_is_read_from_the_covering_index(make_user, make_node, make_image):
    """The usage of every create's quota check and of users/me: an index-only scan, not ~1 heap page
    per VM (3.4 -> 0.5 ms for a project of 1,300 VMs at 1M)."""
    from apps.vms.selectors import project_usage

    users = [make_user(f"tenant{i}") for i in range(20)]
    node, image = make_node("n1"), make_image()
    _copy_vms(users, image.pk, node.pk, 40_000)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) vms")  # the visibility map, as autovacuum keeps it
    with connection.execute_wrapper(explaining := _Explain()):
        usage = project_usage(project_id=personal_project(users[1]).pk)
    # _copy_vms deletes every tenth VM: all of users[0]'s, none of users[1]'s.
    assert (usage.vms, usage.vcpus, usage.memory_mb) == (2000, 2000, 2000 * 256)
    assert project_usage(project_id=personal_project(users[0]).pk).vms == 0
    assert any("Index Only Scan using vms_project_usage_idx" in plan for plan in explaining.plans), (
        explaining.plans
    )


class _Explain:
    """An execute wrapper that keeps the plan of each SELECT before running it."""

    def __init__(self) -> None:
        self.plans: list[str] = []

    def __call__(self, execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("SELECT"):
            cursor = context["cursor"]
            cursor.execute(f"EXPLAIN {sql}", params)
            self.plans.append("\n".join(row[0] for row in cursor.fetchall()))
        return execute(sql, params, many, context)
