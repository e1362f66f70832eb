"""Bringing stored images to nodes: one fetch per (node, image), from a peer or the store, by DWCP.

A VM of a stored image (``Image.sha256``) is created on its node only once the node holds the image
(a ``ready`` NodeImage row); until then it waits, ``pending`` with a ``state_reason`` that tells how far
the fetch is, and a migration waits in phase ``image`` before its destination prepares. The first
user of a missing (node, image) starts the fetch under the row's lock: later ones find it ``fetching``
and wait for the same one. The source is a node that holds the image (up, the least busy sending first)
else the control host's store; the control plane signs a DWCP ticket for the receiver's
IMAGE_INCOMING_DIR/<sha256> and asks the source to push (a node task, or ``store_send`` on the control
queue). The sender reports progress and "sent"; the receiver is told to adopt (verify the sha256, move
into its cache) and reports "adopted": the waiting creates are sent and the waiting migrations
proceed. A failure tries the next source (a retried push resumes from the receiver's journal); with
none left the waiting VMs fail (``error``, the image and the cause named) and the waiting migrations
roll back, their VM still running on its source. Reports are applied idempotently: a report naming a
fetch that is not the row's current one changes nothing.
"""

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Unpack

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from apps.core.conf import novacron_setting
from apps.core.errors import InvalidState
from apps.networks.nics import NICS_PREFETCH
from apps.vms import cache as vm_cache
from apps.vms import dispatch
from apps.vms.choices import ImageKind, NodeStatus, VMState
from apps.vms.models import VM, Image, Node
from workers import contract
from workers.dwcp import DWCPError, sign_ticket
from workers.image_push import push_image

from .models import NodeImage, NodeImageState
from .store import store_path

logger = logging.getLogger(__name__)

STORE = contract.IMAGE_STORE_SOURCE
WAITING_STATES = (VMState.PENDING, VMState.PROVISIONING)


def is_stored(image: Image) -> bool:
    """Whether VMs of ``image`` boot from a node's cache copy (else from a path, as before the store)."""
    return bool(image.sha256) and image.kind == ImageKind.DISK and not image.path


def target(sha256: str) -> str:
    return f"{contract.IMAGE_INCOMING_DIR}/{sha256}"


def ensure(node: Node, image: Image) -> NodeImage:
    """The (node, image) row, locked; a fetch is started unless the node holds the image or one runs."""
    row, created = NodeImage.objects.get_or_create(
        node=node, image=image, defaults={"state": NodeImageState.FETCHING}
    )
    row = NodeImage.objects.select_for_update(of=("self",)).select_related("node", "image").get(pk=row.pk)
    if created or row.state == NodeImageState.FAILED:
        _start(row, tried=[])
    return row


def send_creates(vms: Sequence[VM]) -> None:
    """Send the creates of ``vms`` whose node holds their image; the others wait for their fetch.

    Runs in its own transaction (after the creating one committed): the rows of a fetch are locked
    after, never while, the VMs' nodes are. ``vms`` then show what was recorded (a waiting reason, or
    the error of a fetch that could not start).
    """
    ids = [vm.pk for vm in vms]
    with transaction.atomic():
        for vm in (
            VM.objects.filter(pk__in=ids, state__in=WAITING_STATES, node__isnull=False)
            .select_related("node", "image")
            .prefetch_related(NICS_PREFETCH)
            .order_by("pk")
        ):
            assert vm.node is not None
            if is_stored(vm.image):
                row = ensure(vm.node, vm.image)
                if row.state != NodeImageState.READY:
                    _show_waiting(row)
                    continue
            dispatch.send_on_commit(vm, contract.NODE_VM_CREATE)
    recorded = VM.objects.select_related("node").in_bulk(ids)
    for vm in vms:
        vm.state, vm.state_reason = recorded[vm.pk].state, recorded[vm.pk].state_reason
        vm.node = recorded[vm.pk].node


def _sources(row: NodeImage, tried: list[str]) -> list[str]:
    """Where ``row``'s image can come from, best first: peers that hold it (least busy first), the store."""
    peers = (
        NodeImage.objects.filter(image=row.image, state=NodeImageState.READY, node__status=NodeStatus.UP)
        .exclude(node=row.node_id)
        .exclude(node__name__in=tried)
        .values_list("node__name", flat=True)
    )
    busy = dict(
        NodeImage.objects.filter(state=NodeImageState.FETCHING, source__in=list(peers))
        .values_list("source")
        .annotate(n=Count("id"))
        .values_list("source", "n")
    )
    ordered = sorted(peers, key=lambda name: (busy.get(name, 0), name))
    if STORE not in tried and store_path(row.image.sha256).is_file():
        ordered.append(STORE)
    return ordered


def _start(row: NodeImage, *, tried: list[str], cause: str = "") -> None:
    """Start (or restart) the fetch of a locked row from the best source not tried yet."""
    sources = _sources(row, tried)
    if not sources:
        why = cause or "no node holds it and the store has no copy"
        _fail(row, f"image {row.image.name} could not be fetched to {row.node.name}: {why}")
        return
    secret = settings.DWCP_SECRET
    if not secret:
        raise InvalidState("DWCP_SECRET is not set on the control plane: no image can be fetched.")
    source = sources[0]
    row.state, row.source, row.reason = NodeImageState.FETCHING, source, ""
    row.fetch_id, row.tried, row.percent = uuid.uuid4(), [*tried, source], 0.0
    row.save()
    sha256 = row.image.sha256
    request: contract.ImageSend = {
        "fetch_id": str(row.fetch_id),
        "sha256": sha256,
        "dest_node": row.node.name,
        "dest_dwcp_address": row.node.dwcp_address,
        "target": target(sha256),
        "ticket": sign_ticket(
            secret=secret,
            source_node=source,
            dest_node=row.node.name,
            kind="file",
            target=target(sha256),
            transfer_id=str(row.fetch_id),
            ttl_seconds=novacron_setting("MIGRATION_TICKET_TTL"),
        ),
        "streams": novacron_setting("MIGRATION_STREAMS"),
    }
    logger.info(
        "image %s: fetching to %s from %s (fetch %s)", row.image.name, row.node.name, source, row.fetch_id
    )
    if source == STORE:
        from .fetch_tasks import store_send  # noqa: PLC0415 - tasks import services

        transaction.on_commit(lambda: store_send.delay(**request))
    else:
        signature = dispatch.app.signature(
            contract.NODE_IMAGE_SEND, kwargs=request, queue=contract.node_queue(source)
        )
        transaction.on_commit(signature.apply_async)
    _show_waiting(row)


def _waiting_vms(row: NodeImage) -> list[VM]:
    return list(
        VM.objects.filter(node=row.node_id, image=row.image_id, state__in=WAITING_STATES)
        .select_related("node", "image")
        .prefetch_related(NICS_PREFETCH)
    )


def waiting_reason(row: NodeImage) -> str:
    step = int(row.percent) // contract.IMAGE_PROGRESS_STEP * contract.IMAGE_PROGRESS_STEP
    return f"fetching image {row.image.name} from {row.source}: {step} %"


def _show_waiting(row: NodeImage) -> None:
    """The waiting VMs (and migrations) show how far the fetch is."""
    reason = waiting_reason(row)
    waiting = VM.objects.filter(node=row.node_id, image=row.image_id, state__in=WAITING_STATES).exclude(
        state_reason=reason
    )
    changed = list(waiting.values_list("pk", "project_id"))
    if changed:
        VM.objects.filter(pk__in=[pk for pk, _ in changed]).update(state_reason=reason)
        vm_cache.vm_rows_changed(changed)
    from apps.migrations.services import image_phase  # noqa: PLC0415 - migrations import this module

    image_phase.fetch_moved(row, reason)


def _ready(row: NodeImage) -> None:
    row.state, row.reason, row.percent = NodeImageState.READY, "", 100.0
    row.save()
    vms = _waiting_vms(row)
    for vm in vms:
        dispatch.send_on_commit(vm, contract.NODE_VM_CREATE)
    if vms:
        VM.objects.filter(pk__in=[vm.pk for vm in vms]).update(state_reason="")
        vm_cache.vms_changed(vms)
    from apps.migrations.services import image_phase  # noqa: PLC0415 - migrations import this module

    image_phase.fetch_done(row)


def _fail(row: NodeImage, reason: str) -> None:
    from apps.migrations.services import image_phase  # noqa: PLC0415 - migrations import this module
    from apps.vms.services.reports import vm_record_report  # noqa: PLC0415 - reports import services

    row.state, row.reason, row.fetch_id = NodeImageState.FAILED, reason[:500], None
    row.save()
    logger.warning("%s", reason)
    for vm in _waiting_vms(row):
        vm_record_report(
            vm_id=str(vm.pk), operation="create", ok=False, state="error", reason=reason, node=row.node.name
        )
    image_phase.fetch_failed(row, reason)


def _locked_fetch(fetch_id: str) -> NodeImage | None:
    try:
        key = uuid.UUID(fetch_id)
    except ValueError:
        return None
    return (
        NodeImage.objects.select_for_update(of=("self",))
        .select_related("node", "image")
        .filter(fetch_id=key, state=NodeImageState.FETCHING)
        .first()
    )


@transaction.atomic
def fetch_report(**report: Unpack[contract.ImageFetchReport]) -> None:
    """Apply a step of a fetch (or a node's missing image); a report of another fetch changes nothing."""
    event, reporter, detail = report["event"], report["node"], report.get("detail", "")
    if event == "missing":
        _missing(reporter, report.get("vm_id", ""))
        return
    row = _locked_fetch(report["fetch_id"])
    if row is None:
        logger.info("image fetch %s: %s from %s ignored (not under way)", report["fetch_id"], event, reporter)
        return
    if event == "progress" and reporter == row.source:
        row.percent = max(row.percent, min(float(report.get("percent", 0.0)), 99.0))
        row.save(update_fields=["percent", "updated_at"])  # a slow fetch is not a stalled one
        _show_waiting(row)
    elif event == "sent" and reporter == row.source:
        logger.info("image %s sent to %s by %s: %s", row.image.name, row.node.name, reporter, detail)
        adopt: contract.ImageAdopt = {
            "fetch_id": str(row.fetch_id),
            "sha256": row.image.sha256,
            "size_bytes": row.image.size_bytes,
        }
        signature = dispatch.app.signature(
            contract.NODE_IMAGE_ADOPT, kwargs=adopt, queue=contract.node_queue(row.node.name)
        )
        transaction.on_commit(signature.apply_async)
    elif event == "adopted" and reporter == row.node.name:
        _ready(row)
    elif event == "failed" and reporter in (row.source, row.node.name):
        logger.warning(
            "image %s: fetch to %s from %s failed: %s", row.image.name, row.node.name, row.source, detail
        )
        _start(row, tried=row.tried, cause=f"{reporter}: {detail}")


def _missing(node_name: str, vm_id: str) -> None:
    """A node lacks the image of a VM it was asked to create: fetch it (again); the VM waits."""
    vm = VM.objects.select_related("node", "image").filter(pk=vm_id).first() if vm_id else None
    if vm is None or vm.node is None or vm.node.name != node_name or vm.state not in WAITING_STATES:
        return
    row = ensure(vm.node, vm.image)
    if row.state == NodeImageState.READY:  # the node lost it (evicted, disk wiped): fetch it again
        logger.warning("image %s: %s no longer holds it; fetching it again", vm.image.name, node_name)
        _start(row, tried=[])


@transaction.atomic
def node_images(*, node: str, images: list[contract.CachedImage], over_limit: str = "") -> None:
    """A node's cache listing: ready rows follow it (an image it no longer holds loses its row)."""
    node_row = Node.objects.filter(name=node).first()
    if node_row is None:
        return
    held = {entry["sha256"] for entry in images}
    rows = list(
        NodeImage.objects.select_for_update(of=("self",)).filter(node=node_row).select_related("image")
    )
    for row in rows:
        if row.state == NodeImageState.READY and row.image.sha256 not in held:
            row.delete()
        elif row.state == NodeImageState.FAILED and row.image.sha256 in held:
            row.state, row.reason = NodeImageState.READY, ""  # it came after all (another image's fetch)
            row.save(update_fields=["state", "reason", "updated_at"])
    known = {row.image_id for row in rows}
    for image in Image.objects.filter(sha256__in=held).exclude(pk__in=known):
        NodeImage.objects.get_or_create(node=node_row, image=image, defaults={"state": NodeImageState.READY})
    if over_limit:
        logger.warning("node %s: %s", node, over_limit)


def fetches_watchdog() -> list[str]:
    """Restart from the next source the fetches without a report for ``IMAGE_FETCH_STALL_TIMEOUT``
    seconds (a sender or a receiver lost with its worker); returns the images' rows restarted."""
    timeout = novacron_setting("IMAGE_FETCH_STALL_TIMEOUT")
    stalled = NodeImage.objects.filter(
        state=NodeImageState.FETCHING, updated_at__lt=timezone.now() - timedelta(seconds=timeout)
    ).values_list("fetch_id", flat=True)
    restarted = []
    for fetch_id in list(stalled):
        with transaction.atomic():
            row = _locked_fetch(str(fetch_id))
            if row is None or row.updated_at >= timezone.now() - timedelta(seconds=timeout):
                continue
            logger.warning("image %s: fetch to %s from %s stalled", row.image.name, row.node.name, row.source)
            _start(row, tried=row.tried, cause=f"{row.source}: no report for {timeout} s")
            restarted.append(str(row.pk))
    return restarted


_pushing: set[str] = set()  # fetches this process sends from the store (a redelivered task waits out)
_pushing_lock = threading.Lock()


def store_push(**request: Unpack[contract.ImageSend]) -> None:
    """Send an image from the control host's store as fetch ``request["fetch_id"]`` asks."""
    fetch_id, sha256 = request["fetch_id"], request["sha256"]
    with _pushing_lock:
        if fetch_id in _pushing:
            return
        _pushing.add(fetch_id)
    try:
        if not NodeImage.objects.filter(
            fetch_id=fetch_id, state=NodeImageState.FETCHING, source=STORE
        ).exists():
            return

        def report(event: contract.ImageFetchEvent, *, percent: float = 0.0, detail: str = "") -> None:
            fetch_report(
                fetch_id=fetch_id, node=STORE, sha256=sha256, event=event, percent=percent, detail=detail
            )

        try:
            detail = push_image(
                store_path(sha256),
                request,
                secret=settings.DWCP_SECRET,
                source_node=STORE,
                step=lambda percent: report("progress", percent=percent),
                link_outage_seconds=novacron_setting("MIGRATION_LINK_OUTAGE_SECONDS"),
            )
        except (DWCPError, OSError) as exc:
            report("failed", detail=str(exc))
            return
        report("sent", detail=detail)
    finally:
        with _pushing_lock:
            _pushing.discard(fetch_id)
