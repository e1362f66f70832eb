"""The data migration of issue 20 (``vms.0005_projects_own_vms``) on a populated database: the
schema is taken back to per-user ownership, filled through the historical models, and migrated
forward; every VM and batch must land in its owner's personal project, with the per-user quota
row's limits, nothing lost (real PostgreSQL: the migrations' concurrent indexes included)."""

from collections.abc import Iterator
from typing import Any

import pytest
from django.apps import apps as current_apps
from django.core.management.color import no_style
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor

from apps.projects.models import Membership, Project
from apps.vms.models import VM, BatchItem, BatchOperation

PER_USER = [("vms", "0004_vms_owner_usage_idx"), ("projects", "0001_initial")]
ALICE_LIMITS = {"max_vms": 7, "max_vcpus": 21, "max_memory_mb": 4096}
CAROL_LIMITS = {"max_vms": 1, "max_vcpus": 2, "max_memory_mb": 512}
# The limits a project had then (max_networks came later, with its own migration).
HISTORICAL_DEFAULTS = {key: Project.default_quota()[key] for key in ALICE_LIMITS}


def _migrate(targets: list[tuple[str, str]] | None = None) -> Any:
    """Migrate to ``targets`` (None: the latest); the historical apps there."""
    executor = MigrationExecutor(connection)
    targets = targets or executor.loader.graph.leaf_nodes()
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


@pytest.fixture
def per_user_schema(transactional_db: None) -> Iterator[Any]:
    """The schema before projects owned anything; the latest again afterwards, even when migrating
    the test's rows forward failed (then without them: the tests after this one need the schema)."""
    try:
        yield _migrate(PER_USER)
    finally:
        try:
            _migrate()
        except DatabaseError:
            tables = [name for name in connection.introspection.table_names() if name != "django_migrations"]
            connection.ops.execute_sql_flush(connection.ops.sql_flush(no_style(), tables, allow_cascade=True))
            _migrate()


def _populate(old: Any) -> dict[str, Any]:
    user_model = old.get_model("auth", "User")
    node = old.get_model("vms", "Node").objects.create(
        name="n1", address="127.0.0.1", dwcp_address="127.0.0.1:7000", vcpus=64, memory_mb=65536, disk_gb=500
    )
    image = old.get_model("vms", "Image").objects.create(name="img", path="/images/img.qcow2")
    users = {name: user_model.objects.create(username=name) for name in ("alice", "bob", "carol", "dave")}
    # bob already had a personal project (made on first use by the code before this migration).
    project_model = old.get_model("projects", "Project")
    bobs = project_model.objects.create(name="~bob", personal_of_id=users["bob"].pk, **HISTORICAL_DEFAULTS)
    old.get_model("projects", "Membership").objects.create(project=bobs, user=users["bob"], role="admin")
    quota_model = old.get_model("vms", "Quota")
    quota_model.objects.create(user=users["alice"], **ALICE_LIMITS)
    quota_model.objects.create(user=users["carol"], **CAROL_LIMITS)
    vm_model = old.get_model("vms", "VM")
    owned = {"alice": ["a-1", "a-2", "a-3"], "bob": ["b-1", "b-2"]}
    vms = {
        name: vm_model.objects.create(
            owner=users[owner],
            name=name,
            image=image,
            node=node,
            vcpus=1,
            memory_mb=128,
            disk_gb=1,
            state="deleted" if name == "b-2" else "running",
        )
        for owner, names in owned.items()
        for name in names
    }
    batch_model = old.get_model("vms", "BatchOperation")
    item_model = old.get_model("vms", "BatchItem")
    for owner, names in owned.items():
        batch = batch_model.objects.create(owner=users[owner], kind="create", total=len(names))
        for index, name in enumerate(names):
            item_model.objects.create(batch=batch, index=index, vm=vms[name], status="succeeded")
    return {"users": users, "vms": {name: vm.pk for name, vm in vms.items()}, "owned": owned}


@pytest.mark.django_db(transaction=True)
def test_every_vm_and_batch_lands_in_its_owners_personal_project(per_user_schema: Any) -> None:
    before = _populate(per_user_schema)
    _migrate()
    assert current_apps.get_model("vms", "VM") is VM
    users = before["users"]
    for owner, names in before["owned"].items():
        project = Project.objects.get(personal_of_id=users[owner].pk)
        assert project.name == f"~{owner}"
        assert sorted(VM.objects.filter(project=project).values_list("name", flat=True)) == names
        assert set(VM.objects.filter(project=project).values_list("owner_id", flat=True)) == {users[owner].pk}
        (batch,) = BatchOperation.objects.filter(project=project)
        assert batch.owner_id == users[owner].pk and batch.total == len(names)
        assert list(Membership.objects.filter(project=project).values_list("user_id", "role")) == [
            (users[owner].pk, "admin")
        ]
    assert {vm_id: name for name, vm_id in before["vms"].items()} == dict(
        VM.objects.values_list("pk", "name")
    )
    assert VM.objects.get(name="b-2").state == "deleted"
    assert BatchItem.objects.count() == 5 and not BatchItem.objects.filter(vm=None).exists()

    def limits(user: Any) -> dict[str, int]:
        return Project.objects.filter(personal_of_id=user.pk).values(*ALICE_LIMITS).get()

    assert limits(users["alice"]) == ALICE_LIMITS  # from the quota row
    assert limits(users["carol"]) == CAROL_LIMITS  # a quota row and nothing else: kept
    assert limits(users["bob"]) == HISTORICAL_DEFAULTS  # his project, as it was
    assert Project.objects.count() == 3  # dave, with nothing, gets his on first use
    assert Project.objects.filter(personal_of_id=users["bob"].pk).get().memberships.count() == 1
    assert "quotas" not in connection.introspection.table_names()
