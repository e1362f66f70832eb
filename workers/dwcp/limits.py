"""Every size, count and time limit of DWCP, in one place, each with the reason for its value.

A receiver trusts nothing a peer declares: each length read off the wire is checked against one
of these before anything is allocated, so a hostile or broken peer can cost at most these bounds.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# Protocol version spoken by this code. Peers negotiate min(ours, theirs). Version 2 added the
# tunnel's ACK and RESUME frames (a tunnel survives a cut link); a tunnel needs both ends to
# acknowledge, so version 1 peers are refused at the hello rather than half-served. Version 3: file
# transfers survive a cut too (RESUME of a file session; ACK keepalives both ways on file streams,
# which a version 2 sender would take for a protocol error), so version 2 peers are refused as well.
PROTOCOL_VERSION = 3
# Oldest version we still accept; raising it is how an incompatible change is rolled out.
MIN_PROTOCOL_VERSION = 3

# Chunks are the unit of compression, checksumming, resume and dedup. 1 MiB amortises the
# per-frame Python overhead (one header, one hash call, one syscall) to well under 1 % while
# keeping the in-flight memory (queue depth x chunk) small.
DEFAULT_CHUNK_SIZE = 1 * MiB
# Smallest chunk a sender may pick: below this the per-frame overhead dominates and resume
# journals / base indexes grow needlessly.
MIN_CHUNK_SIZE = 64 * KiB
# Largest raw (decoded) size of one data frame. Bounds the allocation a peer can force per frame
# and the decompression output (no decompression bombs).
MAX_CHUNK_SIZE = 4 * MiB
# Control frames carry small JSON documents (tickets, resume ranges). 1 MiB holds the held-range
# list of a badly fragmented multi-TiB resume and nothing we would ever want to parse slower.
MAX_CONTROL_PAYLOAD = 1 * MiB
# A base-image index is 24 bytes per chunk: 16 MiB covers a ~680 GiB base at 1 MiB chunks.
MAX_INDEX_PAYLOAD = 16 * MiB
# Hard cap on any frame's wire length, whatever its type: the largest of the limits above.
MAX_FRAME_PAYLOAD = MAX_INDEX_PAYLOAD
# Files larger than this are refused at OPEN: 64 TiB is far beyond any VM disk we host and keeps
# chunk counts (and the per-chunk checksum arrays) bounded.
MAX_FILE_SIZE = 64 * TiB

# Parallel TCP streams per transfer. More than 16 stops helping even on long fat links and
# multiplies threads and socket buffers (2 x 8 MiB each) per transfer.
MAX_STREAMS = 16
# Measured with bench/dwcp on a 2-core VM: on loopback 4 streams beat 1 by about 20 % (receiving,
# decoding and writing run in parallel per stream); on a tbf-shaped 1 Gbit veth 1, 4 and 8 streams
# all reach the link rate; 8 was faster nowhere. Several flows also ride out loss on WAN paths.
DEFAULT_STREAMS = 4
# Transfers a server runs at once; each costs up to MAX_STREAMS threads and buffers.
MAX_SESSIONS = 64
# Console viewers a server holds at once (one stream each, a few bytes a second), counted apart from
# the transfers: however many consoles are open, a migration or an image fetch still gets a session.
MAX_CONSOLE_SESSIONS = 256
# Connections a server holds (idle pooled ones included), one thread each: a full set of streams
# for every session and one per console, so a flood of connections cannot exhaust the node's
# threads or memory.
MAX_CONNECTIONS = MAX_SESSIONS * MAX_STREAMS + MAX_CONSOLE_SESSIONS

# Socket buffers. 8 MiB covers the bandwidth-delay product of 1 Gbit at 64 ms RTT, so one stream
# is never window-limited on the links we run on.
SOCKET_BUFFER_SIZE = 8 * MiB
# Congestion control we ask for; BBR keeps throughput on lossy/shaped links where CUBIC backs off.
PREFERRED_CONGESTION_CONTROL = b"bbr"
# TCP keepalive: notice a dead peer (pulled cable, crashed host) within about a minute on an
# otherwise idle pooled connection or a stalled tunnel.
KEEPALIVE_IDLE_SECONDS = 30
KEEPALIVE_INTERVAL_SECONDS = 10
KEEPALIVE_PROBES = 3

# The whole handshake (hello + mutual proof) must finish within this; stops slowloris peers from
# holding server threads.
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# A peer must keep bytes flowing during a transfer; a silent connection is dead after this long.
IO_TIMEOUT_SECONDS = 60.0
# Client side: an idle pooled connection is dropped after this long. Must stay below
# SERVER_IDLE_TIMEOUT_SECONDS so the client never reuses a connection the server is closing.
POOL_IDLE_SECONDS = 30.0
# Server side: how long an authenticated connection may sit between transfers.
SERVER_IDLE_TIMEOUT_SECONDS = 120.0
# Idle connections kept per peer address; one full set of streams is what a next transfer needs.
POOL_MAX_IDLE_PER_PEER = MAX_STREAMS
# After sending ERROR we read and discard what the peer still sends for this long, so it sees our
# error frame instead of a TCP reset.
ERROR_LINGER_SECONDS = 1.0

# Sender pipeline: encoded chunks waiting for a stream writer. With 1 MiB chunks this bounds the
# sender's buffered data to ~QUEUE_DEPTH MiB for any file size (memory stays flat); 8 keeps a
# two-core codec pool busy, and a shallow queue lets a new codec level take effect sooner.
SEND_QUEUE_DEPTH = 8
# Tunnels keep little data between the two local sockets. Whatever sits in the sender's queue and
# socket buffers counts as sent for QEMU, which stops the guest for its last pass with that backlog
# still to cross the link: the backlog adds to the guest's pause. Per direction at most one read
# chunk, TUNNEL_SEND_QUEUE_DEPTH chunks and TUNNEL_NOTSENT_LOWAT_BYTES per stream wait unsent
# (~0.6 MiB with 4 streams: ~50 ms at 100 Mbit/s; with 256 KiB chunks, a queue of 8 and 256 KiB per
# stream it was ~3 MiB, and bench-migration's guest pause over 100 Mbit/s was 165-204 ms).
TUNNEL_CHUNK_SIZE = 64 * KiB
TUNNEL_SEND_QUEUE_DEPTH = 4
# The largest tunnel frame a receiver accepts (above the chunk size: peers may chunk differently).
TUNNEL_FRAME_MAX = 256 * KiB
# After the peer's END, how long the last bytes may take to reach the local socket before the tunnel
# is failed (a local end that stopped reading must not hold the session and its target).
TUNNEL_END_DRAIN_SECONDS = 5.0
# Receiver reorder window for tunnels, in frames: a stream whose next frame is further ahead than
# this waits, so reordering memory is bounded by window x TUNNEL_FRAME_MAX (4 MiB).
REORDER_WINDOW = 16
# Replay window of a tunnel, per direction: raw bytes sent but not yet acknowledged by the peer,
# kept to be sent again after a reconnect. The pump stops reading the local socket while it is
# full, which slows QEMU's pre-copy (the guest runs on) instead of growing memory. 32 MiB is ~2.7 s
# of a 100 Mbit link and ~0.3 s of 1 Gbit: several ACK intervals, so a healthy link never fills it.
TUNNEL_REPLAY_WINDOW_BYTES = 32 * MiB
# The receiver acknowledges after this many delivered frames, or after TUNNEL_ACK_INTERVAL_SECONDS.
TUNNEL_ACK_EVERY_FRAMES = 8
TUNNEL_ACK_INTERVAL_SECONDS = 0.5
# Each end sends an ACK on every connection at least this often, data or not (a keepalive), and
# declares a connection dead after TUNNEL_LINK_SILENCE_SECONDS without any frame on it.
TUNNEL_KEEPALIVE_SECONDS = 1.0
TUNNEL_LINK_SILENCE_SECONDS = 4.0
# TCP_USER_TIMEOUT on tunnel connections: the kernel gives up on data unacknowledged this long, so a
# writer blocked on a dead link fails instead of waiting for TCP's minutes of retransmissions.
TUNNEL_TCP_USER_TIMEOUT_MS = 8000
# How long a cut tunnel waits for its peer to come back before both ends fail it (a node setting,
# --link-outage-seconds; this is the default). The server keeps the session, its local socket and
# window that long; the client reconnects with a backoff of 0.25 s doubling up to the cap.
TUNNEL_LINK_OUTAGE_SECONDS = 120.0
TUNNEL_RECONNECT_BACKOFF_MAX_SECONDS = 2.0
# The server end keeps a cut session this much longer than the outage limit: the client, which
# reconnects, gives up first and says why (a migration's source reports the link outage before the
# destination's QEMU sees its stream end), and never finds its session gone while still in its limit.
TUNNEL_SERVER_OUTAGE_GRACE_SECONDS = 5.0
# A reconnect's TCP connect + handshake must finish within this (1.5 round trips; a WAN's RTT is
# far below it): an attempt into a link still down must not outlast the outage limit by much.
TUNNEL_RECONNECT_TIMEOUT_SECONDS = 3.0

# Socket buffers of a connection while it carries a tunnel. A tunnel's stream is latency sensitive
# (QEMU's migration stream, NBD): whatever sits in buffers between the two local sockets counts as
# sent for QEMU, which then stops the guest for its last pass with that backlog still to cross. With
# 8 MiB per stream (the bulk-file setting) the destination finished up to 1.7 s after the source
# over 1 Gbit (bench-migration); 1 MiB keeps the backlog to tens of ms of link time.
TUNNEL_SOCKET_BUFFER_SIZE = 1 * MiB
TUNNEL_NOTSENT_LOWAT_BYTES = 64 * KiB

# Tickets: the control plane mints them just before a transfer; five minutes covers queueing.
DEFAULT_TICKET_TTL_SECONDS = 300
# Receivers refuse tickets valid further ahead than this: the replay memory keeps every seen
# transfer id until its expiry, so this bounds that memory, and limits a leaked ticket's value.
MAX_TICKET_LIFETIME_SECONDS = 3600
# Clock skew tolerated between control plane and nodes (NTP keeps them far closer).
TICKET_CLOCK_SKEW_SECONDS = 30
# Longest ticket we parse; real ones are ~400 bytes. Also bounds node names, targets and ids.
MAX_TICKET_LENGTH = 4 * KiB
MAX_NAME_LENGTH = 255
MAX_TARGET_LENGTH = 1024

# Adaptive codec: a chunk whose sample compresses to more than this fraction of its size is sent
# raw without compressing the rest (the incompressible fast path).
INCOMPRESSIBLE_SAMPLE_RATIO = 0.97
# After compressing a whole chunk, keep the result only if it saves at least this much.
MIN_COMPRESSION_GAIN = 0.03
# Bytes sampled (in three slices) to decide compressibility: cheap next to a 1 MiB chunk.
COMPRESSIBILITY_SAMPLE_SIZE = 12 * KiB
# TCP_NOTSENT_LOWAT: a write blocks while more than this sits in the socket not yet sent (bytes
# in flight do not count, so a long fat pipe still fills its window). It keeps the backlog in our
# queue, where the codec choice can still change, instead of in 8 MiB of kernel buffer. 2 MiB is
# 16 ms of a 1 Gbit link: enough to keep the link busy while a writer thread waits for a core on
# a hypervisor whose guests keep the CPUs busy (512 KiB did worse on a loaded two-core VM, in
# runs too noisy to say by how much).
NOTSENT_LOWAT_BYTES = 2 * MiB
# Unsent bytes left in the socket right after a write: a link-bound writer finds about
# NOTSENT_LOWAT_BYTES there, a CPU-bound one finds its socket drained. Half-way is the cut.
LINK_BACKLOG_BYTES = NOTSENT_LOWAT_BYTES // 2
# The same cut for a connection carrying a tunnel, whose low-water mark is far lower: against the
# bulk cut a tunnel's socket never looked backlogged, so its policy only ever went lighter (raw
# over 1 Gbit, lz4 at best over 100 Mbit, where zstd sends the migration stream in half the time).
TUNNEL_LINK_BACKLOG_BYTES = TUNNEL_NOTSENT_LOWAT_BYTES // 2
# How often the adaptive policy re-decides the compression level from the pipeline's stalls.
ADAPT_INTERVAL_SECONDS = 0.25

# Progress: at most five updates a second reach reporters (Redis, terminal).
PROGRESS_INTERVAL_SECONDS = 0.2
# Resume journal is rewritten at most this often; losing the last second only costs a re-send.
JOURNAL_INTERVAL_SECONDS = 1.0
# Chunks per file: the receiver keeps one bit per chunk (2 MiB at this cap) and one 8-byte checksum
# per chunk while verifying; 2**24 chunks is 16 TiB at 1 MiB chunks.
MAX_CHUNKS_PER_FILE = 2**24
