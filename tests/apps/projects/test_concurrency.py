"""A team project's quota under concurrency (real PostgreSQL, threads with their own connections):
creates by two members at once never exceed it, and a quota change and a create serialize."""

import threading
from collections import Counter
from typing import Any

import pytest
from django.db import connection, transaction

from apps.core.errors import QuotaExceeded
from apps.projects.models import Membership, Project, Role
from apps.projects.services import project_set_quota
from apps.vms.models import VM
from apps.vms.services import VMRequest, vm_create
from tests.apps.vms.test_scheduler import _wait_for_a_lock_wait

RACERS = 12


def _request(image: Any, name: str) -> VMRequest:
    return VMRequest(name=name, image=image, vcpus=1, memory_mb=64, disk_gb=1)


def _in_thread(outcomes: Counter[str], lock: threading.Lock, create: Any) -> None:
    try:
        create()
        result = "created"
    except QuotaExceeded:
        result = "quota"
    finally:
        connection.close()
    with lock:
        outcomes[result] += 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_by_two_members_respect_the_project_quota(
    make_user: Any, make_node: Any, make_image: Any
) -> None:
    make_node("a", vcpus=1000, memory_mb=1_000_000, disk_gb=100_000)
    image = make_image()
    members = [make_user("carol"), make_user("erin")]
    project = Project.objects.create(name="team", max_vms=3, max_vcpus=100, max_memory_mb=100_000)
    for user in members:
        Membership.objects.create(project=project, user=user, role=Role.MEMBER)
    outcomes: Counter[str] = Counter()
    barrier = threading.Barrier(RACERS)
    lock = threading.Lock()

    def create(index: int) -> None:
        owner = members[index % 2]
        barrier.wait()
        vm_create(owner=owner, project_id=project.pk, request=_request(image, f"vm{index}"))

    threads = [
        threading.Thread(target=_in_thread, args=(outcomes, lock, lambda i=i: create(i)))
        for i in range(RACERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes == {"created": 3, "quota": RACERS - 3}
    assert VM.objects.filter(project=project).count() == 3


@pytest.mark.django_db(transaction=True)
def test_a_create_waits_for_a_quota_change_and_checks_the_new_limits(
    make_user: Any, make_node: Any, make_image: Any
) -> None:
    make_node("a", vcpus=1000, memory_mb=1_000_000, disk_gb=100_000)
    image = make_image()
    carol = make_user("carol")
    project = Project.objects.create(name="team", max_vms=5, max_vcpus=100, max_memory_mb=100_000)
    Membership.objects.create(project=project, user=carol, role=Role.MEMBER)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def create() -> None:
        vm_create(owner=carol, project_id=project.pk, request=_request(image, "vm"))

    with transaction.atomic():
        project_set_quota(project=project, limits={"max_vms": 0})
        thread = threading.Thread(target=_in_thread, args=(outcomes, lock, create))
        thread.start()
        _wait_for_a_lock_wait()  # the create waits for the quota change's lock on the project row
    thread.join(timeout=30)
    assert outcomes == {"quota": 1}
    assert not VM.objects.exists()
