"""The message contract between the control plane and node workers.

Both sides name tasks and queues through these constants and nothing else: the control plane sends
node tasks by name (it never imports node code) and node workers send their reports to the control
queue by name (they never import Django). Every payload is declared here once, as a ``TypedDict`` of a
task's kwargs or of a Redis value; senders build it and receivers take it (``**kwargs: Unpack[...]``),
so mypy checks both sides against the same declaration. Kinds (roles, events, modes, states) are
``Literal``s. On the wire a payload is the JSON object of its keys: a key added to a payload is
``NotRequired`` until every node runs the code that sends it, so one deploy can mix versions.
"""

from typing import Final, Literal, NotRequired, Required, TypedDict, get_args

CONTROL_QUEUE: Final = "control"


def node_queue(node_name: str) -> str:
    """The Celery queue a node's worker consumes."""
    return f"node.{node_name}"


# --- VMs --------------------------------------------------------------------------------------------


class ImageDescription(TypedDict, total=False):
    """A VM's boot image: a disk (``path``, ``format``) or a kernel (``kernel_path``, ``initrd_path``,
    ``cmdline``). The control plane sends every key (the unused ones empty) and the catalog ``name``.
    A stored disk image has ``sha256`` (and ``size_bytes``) and an empty ``path``: the node takes its
    base from its own image cache, where it is named by that digest."""

    kind: Required[Literal["disk", "kernel"]]
    name: str
    format: str
    path: str
    sha256: str
    size_bytes: int
    kernel_path: str
    initrd_path: str
    cmdline: str


class VmDescription(TypedDict):
    """The VM a node task is about: what a node needs to create and run it."""

    id: str
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: ImageDescription
    extra_kernel_args: NotRequired[list[str]]  # kernel images only
    nics: NotRequired[list["NicDescription"]]  # in guest order; absent or empty: no network device
    seed: NotRequired["SeedDescription"]  # absent: no cloud-init seed drive


class SeedDescription(TypedDict):
    """What the VM's cloud-init NoCloud seed carries; the node builds the seed drive from it and from
    the VM's id (meta-data's instance-id) and NICs (network-config). ``user_data`` is the user's
    opaque text (empty: none): it is never logged or shown in task arguments."""

    hostname: str
    ssh_keys: list[str]
    user_data: str


# Node tasks of the VM lifecycle; kwargs: VmOperationRequest.
NODE_VM_CREATE: Final = "novacron.node.vm_create"
NODE_VM_START: Final = "novacron.node.vm_start"
NODE_VM_STOP: Final = "novacron.node.vm_stop"
NODE_VM_REBOOT: Final = "novacron.node.vm_reboot"
NODE_VM_DELETE: Final = "novacron.node.vm_delete"


class VmOperationRequest(TypedDict):
    vm: VmDescription
    request_id: NotRequired[str]  # for the logs of both sides


Operation = Literal["create", "start", "stop", "reboot", "delete"]
OPERATIONS: Final[tuple[Operation, ...]] = get_args(Operation)

# A VM's state as the node reports it (``workers.qemu.VmState``), and as the control plane records it.
NodeVmState = Literal["running", "paused", "stopped", "dead", "unknown"]
ControlVmState = Literal["running", "stopped", "error"]


# What a lifecycle report says the VM is now: a state, or how far its create or delete went.
ReportedVmState = Literal[ControlVmState, "provisioning", "deleted"]

# Control task: the outcome of a lifecycle task (``final=False``: work has started).
CONTROL_VM_REPORT: Final = "novacron.control.vm_report"


class VmReport(TypedDict):
    vm_id: str
    operation: Operation
    ok: bool
    state: ReportedVmState
    reason: NotRequired[str]
    node: str
    final: NotRequired[bool]  # default True


class HypervisorFacts(TypedDict):
    """What a node's host offers (``QemuDriver.node_facts``), shown with the node."""

    cpu_count: int
    memory_mb: int
    disk_free_gb: float
    data_dir: str
    qemu_version: str
    kvm_usable: bool
    kvm_probe_reason: str
    accelerator: str


# Control task: a node worker announces itself (at start).
CONTROL_NODE_REGISTER: Final = "novacron.control.node_register"


class NodeRegistration(TypedDict):
    name: str
    address: str
    dwcp_address: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    hypervisor: HypervisorFacts
    vxlan_port: NotRequired[int]  # the UDP port of this node's VXLAN devices (default VXLAN_PORT)
    networking: NotRequired[str]  # "" when the node can attach NICs, else why not (no CAP_NET_ADMIN, ...)


class VmStateEntry(TypedDict):
    """One VM a node holds, as the control side reconciles it."""

    id: str
    state: ControlVmState
    node_state: NodeVmState
    reason: str


# Control task, sent at start with every VM the node holds (complete=True: the control side reconciles)
# and whenever a VM's state changes by itself (a QEMU that died, a guest that powered off).
CONTROL_NODE_VM_STATES: Final = "novacron.control.node_vm_states"


class NodeVmStates(TypedDict):
    node: str
    vms: list[VmStateEntry]
    complete: bool


# --- Networks -------------------------------------------------------------------------------------
# A network is a VXLAN overlay (``vni``) with an IPv4 subnet. On each node that hosts one of its VMs it
# is a bridge with a VXLAN device (flooding to the overlay's peers) and one tap per local NIC. The
# bridge holds ``gateway`` with the same address and MAC on every node (a distributed gateway: nothing
# changes for a guest when it moves); the node's DHCP server answers only for the MACs of its own NICs.

VXLAN_PORT: Final = 4789


class NetworkDescription(TypedDict):
    """A network as a node builds it."""

    id: str  # the control plane's id, for logs and reports
    name: str
    vni: int  # 1 to 16777215, unique in the fleet
    cidr: str  # IPv4 network, e.g. "10.20.0.0/24"
    gateway: str  # an address in cidr, never given to a NIC
    dns: list[str]  # DNS servers handed out by DHCP (may be empty)
    mtu: int  # the guests' MTU (the underlay's minus VXLAN's 50 bytes)
    external: bool  # guests reach the outside through NAT on the node they run on
    physical_network: str  # "" or a name each node maps to one of its interfaces (provider networks)


class NicDescription(TypedDict):
    mac: str  # lower case, colon-separated
    ipv4: str  # the NIC's address in network.cidr, handed out by the node's DHCP
    network: NetworkDescription


class OverlayPeer(TypedDict):
    address: str  # the peer node's underlay address (its NODE_ADDRESS)
    port: int  # its VXLAN UDP port


# Node task: the other nodes hosting each network (by VNI, as text: JSON keys) that this node hosts or
# is about to host (a migration's destination). Sent whenever that set changes, and with
# complete=True after a node registers: the node then also drops the peers of networks not listed.
NODE_NETWORK_PEERS: Final = "novacron.node.network_peers"


class NetworkPeers(TypedDict):
    peers: dict[str, list[OverlayPeer]]
    complete: bool


# --- Migrations -----------------------------------------------------------------------------------
# Roles: the source node sends, the destination node receives; both report with MigrationReport.

Role = Literal["source", "dest"]
MigrationMode = Literal["live", "cold"]
# What a node tells of a migration:
#   prepared (dest, with its targets), phase (source: "disk" -> "memory"), transferred (source: live:
#   QEMU completed, source paused; cold: disk sent and verified), switched (dest runs or holds the VM),
#   failed, cancelled, aborted (this migration's QEMU and files removed on that side), cleaned (source
#   copy removed after the switch), kept (a leftover copy this node did not remove: the detail says why).
#   forecast (source, live, memory phase: its convergence verdict changed, or another pass while it is
#   "no"; the detail is the reason, the stats carry converging, converging_reason and memory_passes).
ReportEvent = Literal[
    "prepared",
    "phase",
    "transferred",
    "switched",
    "failed",
    "cancelled",
    "aborted",
    "cleaned",
    "kept",
    "forecast",
]
# Whether a live migration's pre-copy converges under its downtime limit (the source's forecast,
# ``workers.node.migration.forecast``): unknown until QEMU measured the guest's dirty rate.
Converging = Literal["yes", "no", "unknown"]
CONVERGING_VALUES: Final[tuple[Converging, ...]] = get_args(Converging)
# Where each transfer lands on the destination, by name ("disk"; live also "memory"): the disk file
# (cold) or the NBD and incoming migration sockets (live), relative to the destination's DWCP roots.
Targets = dict[str, str]
Tickets = dict[str, str]  # a signed DWCP ticket per target name


class TransferOptions(TypedDict):
    bandwidth_limit_mbps: int | None
    downtime_limit_ms: int
    auto_converge: bool
    streams: int


# Node tasks of a migration; every payload names the migration and its VM.
# dest -> "prepared" with the targets.
NODE_MIGRATION_PREPARE: Final = "novacron.node.migration_prepare"
# source -> "phase", then "transferred" with stats.
NODE_MIGRATION_SEND: Final = "novacron.node.migration_send"
# dest (cold only) -> "switched" once the VM is defined (and started).
NODE_MIGRATION_FINISH: Final = "novacron.node.migration_finish"
# either -> "aborted": QEMU and files of this migration removed on that side.
NODE_MIGRATION_ABORT: Final = "novacron.node.migration_abort"
# source after the switch -> "cleaned": source QEMU quit, disk and run files removed.
NODE_MIGRATION_CLEANUP: Final = "novacron.node.migration_cleanup"


class MigrationPrepare(TypedDict):
    migration_id: str
    vm: VmDescription
    mode: MigrationMode
    source_node: str


class MigrationSend(TypedDict):
    migration_id: str
    vm: VmDescription
    mode: MigrationMode
    dest_node: str
    dest_dwcp_address: str
    tickets: Tickets
    targets: Targets
    options: TransferOptions


class MigrationFinish(TypedDict):
    migration_id: str
    vm: VmDescription
    start: bool


class MigrationAbort(TypedDict):
    migration_id: str
    vm: VmDescription
    role: Role
    restart: NotRequired[bool]  # source: start the VM again if it is not running (default False)


class MigrationCleanup(TypedDict):
    migration_id: str
    vm: VmDescription


# How first-hand a "failed" report's detail is. Both sides can report one failure and in either order
# (the destination's measured memory mismatch, and the source resuming because it was told of it): the
# migration's error is the detail of the highest-ranked cause, the first of equals; every report stays
# in its history.
#   relayed: this node fails because the other side told it to (it can only repeat the verdict);
#   error: something failed here (the default);
#   measured: a check here measured the fault (its detail holds the figures).
FailureCause = Literal["relayed", "error", "measured"]
FAILURE_CAUSES: Final[tuple[FailureCause, ...]] = get_args(FailureCause)  # lowest rank first


class QemuMigrationFigures(TypedDict, total=False):
    """QEMU's own figures of a live migration (``query-migrate`` once completed; empty if it gave none)."""

    total_time_ms: int | None
    setup_time_ms: int | None
    ram_transferred: int | None
    dirty_sync_count: int | None


class MigrationStats(TypedDict, total=False):
    """Figures a node reports with an event; the control side merges them into the migration's stats.

    Times ``*_at`` are QMP event timestamps (epoch seconds) on the node's clock.
    """

    # source, cold
    disk_bytes: int
    transfer_seconds: float
    codec_mix: dict[str, int]
    downtime_ms: float | None  # None: the VM was stopped for the whole transfer
    # source, live
    qemu_downtime_ms: float | None
    source_stopped_at: float | None
    mirror_completed_at: float | None
    source_completed_at: float | None
    memory_total: float | None
    disk_total: float | None
    qemu: QemuMigrationFigures
    # source, both modes
    wire_bytes: int
    # destination, live
    dest_completed_at: float
    dest_resumed_at: float
    memory_check: str  # the verdict: match, skipped, unverified (workers.node.migration.memory_check)
    memory_check_ms: float
    # source, live, "forecast" reports
    converging: Converging
    converging_reason: str
    memory_passes: int  # QEMU's dirty-sync-count when the verdict was given


# Control task: a node reports a step of a migration.
CONTROL_MIGRATION_REPORT: Final = "novacron.control.migration_report"


class MigrationReport(TypedDict):
    migration_id: str
    node: str
    role: Role
    event: ReportEvent
    detail: NotRequired[str]
    stats: NotRequired[MigrationStats]
    targets: NotRequired[Targets]  # "prepared" only
    cause: NotRequired[FailureCause]  # "failed" only; default "error"


class MigrationCopy(TypedDict):
    """A copy of a VM this node holds for a migration, as its migration marker records it."""

    migration_id: str
    vm_id: str
    role: Role


# A node worker that starts lists the destination copies its migration markers name (QEMUs left waiting
# with -incoming defer, half-received disks), since it cannot tell which of their migrations still run
# (MigrationCopies). The control plane answers with NODE_MIGRATION_LEFTOVERS (MigrationLeftovers): the
# copies whose migration is no longer active (failed, cancelled, or unknown to it). The node removes an
# ended copy only while its marker still names that migration and its guest never ran there; a copy of
# an active migration is never listed.
CONTROL_MIGRATION_COPIES: Final = "novacron.control.migration_copies"
NODE_MIGRATION_LEFTOVERS: Final = "novacron.node.migration_leftovers"


class MigrationCopies(TypedDict):
    node: str
    copies: list[MigrationCopy]


class MigrationLeftovers(TypedDict):
    ended: list[MigrationCopy]


# Live progress, written by the source node at least twice a second while it transfers: a Redis hash
# of MigrationProgress (values as strings) and the same fields as JSON on a pub/sub channel.
MIGRATION_PROGRESS_KEY: Final = "novacron:migration:{id}:progress"
MIGRATION_EVENTS_CHANNEL: Final = "novacron:migration:{id}:events"


ProgressPhase = Literal["disk", "memory"]
# A cut link is reconnected by DWCP within the node's --link-outage-seconds (QEMU does not see it).
LinkState = Literal["up", "reconnecting"]


class MigrationProgress(TypedDict, total=False):
    """A progress snapshot. The forecast's figures (live only) are "" while unknown."""

    phase: ProgressPhase
    percent: float
    memory_total: float
    memory_processed: float
    memory_remaining: float
    dirty_rate: float  # bytes/s
    disk_total: float
    disk_processed: float
    disk_remaining: float
    wire_bytes: float
    rate_bps: float
    eta_seconds: float  # the whole migration's remaining time (live: the forecast's)
    phase_eta_seconds: float  # the current phase's (live memory phase: the current pass)
    converging: Converging
    converging_reason: str  # the verdict's reason, with its figures
    link_rate_bps: float  # wire bits/s over the forecast's window
    compression_ratio: float  # raw / wire bytes over that window
    memory_passes: float  # QEMU's dirty-sync-count
    memory_transferred: float  # QEMU's ram.transferred
    tunnel_raw_bytes: float  # into the DWCP tunnels so far (live)
    tunnel_wire_bytes: float  # on the wire from them so far (live)
    sampled_dirty_rate: float  # bytes/s, QMP calc-dirty-rate's sample of the guest (live, disk phase)
    link: LinkState  # the DWCP tunnels' link to the destination (live)
    outage_seconds: float  # while ``link`` is reconnecting: how long it has been cut
    updated: float  # epoch seconds


MIGRATION_PROGRESS_FIELDS: Final = tuple(MigrationProgress.__annotations__)
MIGRATION_PROGRESS_TEXT_FIELDS: Final = frozenset({"phase", "converging", "converging_reason", "link"})

# Control knobs the source polls while it transfers: a Redis hash of MigrationControl, written as
# strings ("" clears the bandwidth limit; "1" sets a flag).
MIGRATION_CONTROL_KEY: Final = "novacron:migration:{id}:control"


class MigrationControl(TypedDict, total=False):
    bandwidth_limit_mbps: int | None  # None: no limit
    cancel: bool
    force_complete: bool


# --- Images ---------------------------------------------------------------------------------------
# A stored disk image (``ImageDescription.sha256``) travels to a node on first use and stays in the
# node's cache, DATA/<IMAGE_CACHE_DIR>/<sha256> (the data dir is the node's DWCP root); the node uses
# that file as the VM's base, never a path from a user. One fetch per (node, image) at a time, started by
# the control plane: it signs a DWCP ticket (kind "file", target <IMAGE_INCOMING_DIR>/<sha256> on the
# receiver) and asks the source to push it: a node that holds the image (NODE_IMAGE_SEND) or the
# control host's store (a control task; the ticket's source is IMAGE_STORE_SOURCE). The sender reports
# "progress" every IMAGE_PROGRESS_STEP percent and at least every IMAGE_PROGRESS_INTERVAL seconds (a
# fetch without reports for longer is restarted from the next source), then "sent" or "failed"; the
# receiver is then told
# NODE_IMAGE_ADOPT: it checks the sha256, moves the file into its cache and reports "adopted" (or
# "failed"). A create whose image the node lacks is answered by "missing" (no VM report): the control
# plane fetches the image and sends the create again. Nodes list what they hold (CONTROL_NODE_IMAGES)
# at start and after every adoption or eviction.

IMAGE_CACHE_DIR: Final = "images"
IMAGE_INCOMING_DIR: Final = "images/incoming"
IMAGE_STORE_SOURCE: Final = "store"  # the ticket's source_node when the control host's store sends
IMAGE_PROGRESS_STEP: Final = 10  # percent between two "progress" reports of a push
IMAGE_PROGRESS_INTERVAL: Final = 30.0  # seconds: the longest a push goes without a "progress" report

# Node task, on the source: push its cached copy to the receiver (reports progress, sent or failed).
NODE_IMAGE_SEND: Final = "novacron.node.image_send"
# Node task, on the receiver: verify the received file and adopt it into the cache (adopted or failed).
NODE_IMAGE_ADOPT: Final = "novacron.node.image_adopt"


class ImageSend(TypedDict):
    fetch_id: str
    sha256: str
    dest_node: str
    dest_dwcp_address: str
    target: str  # <IMAGE_INCOMING_DIR>/<sha256>, relative to the receiver's data dir
    ticket: str
    streams: int


class ImageAdopt(TypedDict):
    fetch_id: str
    sha256: str
    size_bytes: int


# progress, sent: the sender; adopted: the receiver; failed: either; missing: a node asked to create a VM
# on an image it does not hold (fetch_id "", vm_id set).
ImageFetchEvent = Literal["progress", "sent", "adopted", "failed", "missing"]

# Control task: a step of a fetch, or a missing image.
CONTROL_IMAGE_FETCH_REPORT: Final = "novacron.control.image_fetch_report"


class ImageFetchReport(TypedDict):
    fetch_id: str
    node: str  # who reports: a node's name or IMAGE_STORE_SOURCE
    sha256: str
    event: ImageFetchEvent
    percent: NotRequired[float]  # progress
    detail: NotRequired[str]  # failed: why
    vm_id: NotRequired[str]  # missing


class CachedImage(TypedDict):
    sha256: str
    size_bytes: int
    last_used: float  # epoch seconds: the cache's LRU order
    in_use: bool  # a VM (or a migration's copy) on this node is backed by it


# Control task: every image a node's cache holds (the control plane's rows follow it).
CONTROL_NODE_IMAGES: Final = "novacron.control.node_images"


class NodeImages(TypedDict):
    node: str
    images: list[CachedImage]
    over_limit: str  # "" or why the cache stays over its size limit (every image is in use)


# --- Redis values written by nodes and read by the control side --------------------------------------

HEARTBEAT_KEY: Final = "novacron:node:{name}:heartbeat"  # JSON Heartbeat, with a TTL


class Heartbeat(TypedDict):
    ts: float  # epoch seconds
    vms: list[VmStateEntry]
    partial: list[str]  # ids of half-made copies without a definition (a create or a migration under way)


METRICS_LIST: Final = "novacron:metrics"  # JSON MetricSample values, capped
METRICS_LIST_MAX: Final = 100_000  # a control plane that is down for a while loses the oldest samples


class MetricSample(TypedDict):
    ts: float
    node: str
    vm: NotRequired[str]  # per-VM samples only
    name: str
    value: float


# --- Consoles ---------------------------------------------------------------------------------------

# A VM's serial console is reached through its node's DWCP server with a ticket of kind ``console``
# whose target is the VM's uuid (``workers.node.console``); the control plane signs it as this
# source node, valid this long (it is used at once: a viewer connecting, or reconnecting after a move).
CONSOLE_SOURCE_NODE: Final = "control"
CONSOLE_TICKET_TTL_SECONDS: Final = 30
# What a new viewer is sent first: the last output of the console, at most this many bytes.
CONSOLE_SCROLLBACK_BYTES: Final = 64 * 1024
