"""apps/vms/representation.py: the one declaration of the API's VM, and every path that derives from it.

DRF's own fields (built by ``VMSerializer`` from the declaration) are the reference for the values;
a field added to the declaration (monkeypatched here, as a new line would add it) shows in every
path: the create's answer (a model instance), the fixed SQL's list page and detail, the cache and
the fast path, the ORM path of the ``name`` filter, the one-statement rename, the browsable API's
serializer and the schema.
"""

from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from apps.core.renderers import dumps
from apps.vms import representation
from apps.vms.choices import VMAction, VMState
from apps.vms.models import VM
from apps.vms.reads import detail_sql, rows
from apps.vms.serializers import VMSerializer
from tests.conftest import vm_payload

pytestmark = pytest.mark.django_db


@pytest.fixture
def vms(user: Any, node: Any, image: Any) -> list[VM]:
    return [
        VM.objects.create(owner=user, name="plain", image=image, node=node, vcpus=1, memory_mb=64, disk_gb=1),
        VM.objects.create(
            owner=user,
            name="unplaced",
            image=image,
            node=None,
            vcpus=2,
            memory_mb=128,
            disk_gb=3,
            state=VMState.ERROR,
            state_reason="No node had room \u2028 «quoted» text",
            pending_action=VMAction.REBOOT,
        ),
    ]


def _drf_fields_json(vm: VM) -> bytes:
    """The VM as DRF's fields built from the declaration write it (``ModelSerializer``'s own
    ``to_representation``), rendered by DRF's JSON renderer."""
    serializer = VMSerializer()
    return JSONRenderer().render(serializers.ModelSerializer.to_representation(serializer, vm))


def test_every_source_of_a_vm_writes_what_drfs_fields_write(vms):
    for vm in vms:
        for instance in (vm, VM.objects.select_related(*representation.relations()).get(pk=vm.pk)):
            expected = _drf_fields_json(instance)
            assert dumps(representation.vm_data(instance)) == expected  # write answers
            assert dumps(VMSerializer(instance).data) == expected  # the browsable API's serializer
        (row,) = rows(detail_sql(of_project=False), [vm.pk])  # the fixed SQL
        assert dumps(row, utc_datetimes=True) == _drf_fields_json(VM.objects.get(pk=vm.pk))


def test_the_fixed_sql_is_derived_from_the_declaration():
    sql = representation.select_sql()
    assert sql.startswith('SELECT v.id::text, v."name", "owner"."username", "project"."name", "node"."name"')
    assert 'JOIN "projects" "project"' in sql and 'LEFT JOIN "projects"' not in sql
    assert 'LEFT JOIN "nodes" "node"' in sql  # a nullable foreign key
    assert 'JOIN "images" "image"' in sql and 'LEFT JOIN "images"' not in sql
    assert representation.orm_paths()[:3] == ("id", "name", "owner__username")
    assert set(representation.relations()) == {"owner", "project", "node", "image"}


@pytest.fixture
def two_more_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lines added to the declaration: a column through a relation, and a formatted one."""
    added = (
        representation.VMField("owner_email", "owner__email"),
        representation.VMField("shouted_name", "name", render=str.upper),
    )
    monkeypatch.setattr(representation, "VM_FIELDS", (*representation.VM_FIELDS, *added))


def _has_them(vm: dict[str, Any], name: str) -> None:
    assert (vm["owner_email"], vm["shouted_name"]) == ("alice@example.com", name.upper()), vm


def test_a_field_added_to_the_declaration_shows_in_every_path(
    forget_api_state, two_more_fields, api, user, node, image
):
    user.email = "alice@example.com"
    user.save()  # (drops the token's memo; the create below writes it again)
    created = api.post("/api/v1/vms/", vm_payload(name="web-1"), format="json")
    assert created.status_code == 202, created.content
    _has_them(created.json(), "web-1")  # from the model instance
    detail = f"/api/v1/vms/{created.json()['id']}/"
    for _ in range(2):  # the fast path's miss (fixed SQL), then its hit (the cached entry)
        _has_them(api.get(detail).json(), "web-1")
        _has_them(api.get("/api/v1/vms/").json()["results"][0], "web-1")
    forget_api_state("authtoken")  # DRF answers: its miss and its hit
    _has_them(api.get("/api/v1/vms/?bust=drf").json()["results"][0], "web-1")
    _has_them(api.get("/api/v1/vms/?bust=drf").json()["results"][0], "web-1")
    _has_them(api.get("/api/v1/vms/?name=web-1").json()["results"][0], "web-1")  # the ORM path
    renamed = api.patch(detail, {"name": "web-2"}, format="json")  # the rename's one statement
    _has_them(renamed.json(), "web-2")
    _has_them(api.get(detail, HTTP_ACCEPT="application/json; indent=2").json(), "web-2")  # the serializer
    schema = SchemaGenerator().get_schema(request=None, public=True)
    assert {"owner_email", "shouted_name"} <= set(schema["components"]["schemas"]["VM"]["properties"])
