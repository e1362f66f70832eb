"""The database helpers on PostgreSQL: bulk_insert (one prepared INSERT or COPY) writes what
bulk_create would, counted and failing the same way; prepared statements read what plain queries
and the ORM read."""

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from apps.core.db import (
    COPY_MIN_ROWS,
    bulk_insert,
    columns,
    fetch_instances,
    fetch_prepared,
    get_by,
    on_postgresql,
    postgresql_or,
)
from apps.projects.services import personal_project
from apps.vms.choices import BatchItemStatus, BatchKind, VMState
from apps.vms.models import VM, BatchItem, BatchOperation, Image, Node

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="COPY is PostgreSQL's")


def _vms(owner, node, image, count: int, prefix: str = "vm") -> list[VM]:
    project = personal_project(owner)
    return [
        VM(
            owner=owner,
            project=project,
            node=node,
            image=image,
            name=f"{prefix}{i}",
            vcpus=1,
            memory_mb=64,
            disk_gb=1,
        )
        for i in range(count)
    ]


def test_many_rows_go_by_one_copy_and_read_back_as_written(user, node, image):
    vms = _vms(user, node, image, COPY_MIN_ROWS)
    with CaptureQueriesContext(connection) as captured:
        bulk_insert(vms)
    assert [query["sql"].split()[0] for query in captured] == ["COPY"]
    stored = {vm.pk: vm for vm in VM.objects.filter(owner=user)}
    assert set(stored) == {vm.pk for vm in vms}
    first = stored[vms[0].pk]
    assert first.state == VMState.PENDING  # the choice's value, not the Enum's name
    assert (first.name, first.node_id, first.image_id, first.state_reason) == ("vm0", node.pk, image.pk, "")
    assert first.created_at == vms[0].created_at == first.updated_at is not None
    # stamped row by row, as bulk_create does: a thousand equal created_at broke paging back
    assert [vm.created_at for vm in vms] == sorted(vm.created_at for vm in vms)
    assert len({vm.created_at for vm in vms}) > 1
    assert first.deleted_at is None


def test_auto_ids_are_the_databases(user, node, image):
    vms = bulk_insert(_vms(user, node, image, COPY_MIN_ROWS))
    batch = BatchOperation.objects.create(owner=user, kind=BatchKind.CREATE, total=len(vms))
    bulk_insert(
        [BatchItem(batch=batch, index=i, vm=vm, status=BatchItemStatus.PENDING) for i, vm in enumerate(vms)]
    )
    ids = list(BatchItem.objects.filter(batch=batch).order_by("index").values_list("id", "status"))
    assert len(ids) == COPY_MIN_ROWS and all(pk is not None for pk, _ in ids)
    assert {status for _, status in ids} == {"pending"}


def test_a_unique_violation_is_djangos_integrity_error(user, node, image):
    bulk_insert(_vms(user, node, image, 1, prefix="taken"))  # taken0, by INSERT
    with pytest.raises(IntegrityError), transaction.atomic():
        bulk_insert(_vms(user, node, image, COPY_MIN_ROWS, prefix="taken"))
    assert VM.objects.filter(owner=user).count() == 1


def _fields(instance) -> list:
    return [getattr(instance, field.attname) for field in instance._meta.concrete_fields]


def test_one_row_is_one_prepared_insert_writing_what_save_writes(user, node, image):
    (vm,) = _vms(user, node, image, 1)
    with CaptureQueriesContext(connection) as captured:
        bulk_insert([vm])
    assert [query["sql"].split()[0] for query in captured] == ["INSERT"]
    assert not vm._state.adding and vm.created_at is not None and vm.created_at <= vm.updated_at
    stored = VM.objects.get(pk=vm.pk)
    assert stored.state == VMState.PENDING  # by value
    assert _fields(stored) == _fields(vm)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'INSERT INTO \"vms\"%%'"
        )
        assert cursor.fetchone()[0] == 1


def test_one_row_with_an_auto_id_gets_the_databases_id(user):
    batch = BatchOperation(owner=user, project=personal_project(user), kind=BatchKind.CREATE, total=0)
    bulk_insert([batch])
    (item,) = bulk_insert([BatchItem(batch=batch, index=0, status=BatchItemStatus.PENDING)])
    assert isinstance(item.pk, int)
    assert BatchItem.objects.get(pk=item.pk).batch_id == batch.pk


def test_one_row_taking_a_name_is_djangos_integrity_error(user, node, image):
    bulk_insert(_vms(user, node, image, 1, prefix="taken"))
    with pytest.raises(IntegrityError), transaction.atomic():
        bulk_insert(_vms(user, node, image, 1, prefix="taken"))
    assert VM.objects.filter(owner=user).count() == 1


def test_fetch_instances_reads_the_instances_the_orm_reads(node):
    Node.objects.filter(pk=node.pk).update(hypervisor={"qemu": "7.2", "kvm": False})
    sql = f"SELECT {columns(Node, 'n')} FROM nodes AS n WHERE n.name = %s"
    (found,) = fetch_instances(Node, sql, [node.name])
    assert _fields(found) == _fields(Node.objects.get(pk=node.pk))
    assert found.hypervisor == {"qemu": "7.2", "kvm": False} and not found._state.adding
    assert fetch_instances(Node, sql, ["no-such-node"]) == []


def test_few_rows_are_one_insert(user, node, image):
    vms = _vms(user, node, image, 3)
    with CaptureQueriesContext(connection) as captured:
        bulk_insert(vms)
    assert [query["sql"].split()[0] for query in captured] == ["INSERT"]
    assert VM.objects.filter(owner=user).count() == 3


def test_get_by_reads_the_instance_the_orm_reads(node, image):
    Node.objects.filter(pk=node.pk).update(hypervisor={"qemu": "7.2", "kvm": False})
    for model, instance in ((Node, node), (Image, image)):
        expected = model.objects.get(pk=instance.pk)
        for field_name, value in (("name", instance.name), ("id", instance.pk)):
            found = get_by(model, field_name, value)
            assert found is not None
            assert [getattr(found, f.attname) for f in model._meta.concrete_fields] == [
                getattr(expected, f.attname) for f in model._meta.concrete_fields
            ]
    assert get_by(Node, "name", node.name).hypervisor == {"qemu": "7.2", "kvm": False}
    assert get_by(Image, "name", "no-such-image") is None


def test_fetch_prepared_reads_what_a_plain_query_reads_and_prepares_it_once(user, node, image):
    VM.objects.create(owner=user, name="one", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1)
    sql = "SELECT id, name, created_at FROM vms WHERE owner_id = %s AND name = %s"
    with connection.cursor() as cursor:
        cursor.execute(sql, [user.pk, "one"])
        expected = cursor.fetchall()
    with CaptureQueriesContext(connection) as captured:
        for _ in range(3):
            assert fetch_prepared(sql, [user.pk, "one"]) == expected
    assert [query["sql"] for query in captured] == [sql] * 3  # counted as queries, as the ORM's are
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s",
            ["SELECT id, name, created_at FROM vms WHERE owner_id = $1 AND name = $2"],
        )
        assert cursor.fetchone()[0] == 1
    assert fetch_prepared(sql, [0, "none"]) == []


def test_fetch_prepared_raises_djangos_errors(user, node, image):
    VM.objects.create(owner=user, name="one", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1)
    VM.objects.create(owner=user, name="two", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        fetch_prepared("UPDATE vms SET name = %s WHERE name = %s RETURNING id", ["one", "two"])


def test_postgresql_or_runs_the_native_function_on_postgresql_and_the_portable_one_elsewhere(monkeypatch):
    def portable(value: int) -> str:
        return f"portable {value}"

    @postgresql_or(portable)
    def native(value: int) -> str:
        return f"native {value}"

    assert native(1) == "native 1"
    monkeypatch.setattr(connection, "vendor", "sqlite")  # what the SQLite file of `make run` reports
    assert not on_postgresql()
    assert native(2) == "portable 2"
