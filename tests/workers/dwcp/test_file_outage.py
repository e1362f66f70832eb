"""File transfers across a cut link: a real sender and server over loopback through the TCP relay
(``helpers.Link``) that the test resets or blackholes. The file must arrive byte-exact in the same
``send_file`` call, the receiver must write each chunk once (only what it does not hold is resent),
progress must show the outage, a forged RESUME is refused, and an outage above the limit fails both
ends with the reason while the receiver keeps its part file and journal for a new ticket."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.dwcp import (
    CallbackReporter,
    DWCPServer,
    Progress,
    TransferInterrupted,
    TransferRefused,
    limits,
    send_file,
)
from workers.dwcp.control import TransferControl
from workers.dwcp.frames import FrameType
from workers.dwcp.sender import TransferResult, negotiate
from workers.dwcp.transport import Channel, ConnectionPool, parse_address

from .helpers import DEST, SECRET, SOURCE, Link, MiB, random_file, sha256_of, wait_for

STREAMS = 2
SIZE = 48 * MiB
# The receiver's log line for a verified file: "... verified (size bytes, W written, ...".
VERIFIED = re.compile(r"verified \((\d+) bytes, (\d+) written")


class Sending:
    """``send_file`` through ``link`` in a thread, with its progress collected."""

    def __init__(self, link: Link, source: Path, ticket: str, **options: object) -> None:
        self.progress: list[Progress] = []
        self.result: TransferResult | None = None
        self.error: BaseException | None = None
        self.transfer_id = ""
        self._thread = threading.Thread(
            target=self._run, args=(link.address, source, ticket, options), daemon=True
        )
        self._thread.start()

    def _run(self, address: str, source: Path, ticket: str, options: dict[str, object]) -> None:
        try:
            self.result = send_file(
                source,
                address=address,
                name="disk.img",
                ticket=ticket,
                secret=SECRET,
                source_node=SOURCE,
                streams=STREAMS,
                codec="raw",
                reporter=CallbackReporter(self.progress.append),
                pool=ConnectionPool(tls=None),
                **options,  # type: ignore[arg-type]
            )
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float) -> TransferResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "send_file still running"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def test_a_file_survives_a_reset_and_a_blackhole_byte_exact_resending_only_what_was_in_flight(
    outage_server: DWCPServer,
    link: Link,
    root: Path,
    tmp_path: Path,
    ticket: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.dwcp.sessions")
    source = random_file(tmp_path / "disk.img", SIZE)  # incompressible: every chunk is written data
    control = TransferControl(bandwidth_limit_mbps=64)  # ~8 MB/s: the cuts land mid-transfer
    sending = Sending(link, source, ticket("disk.img"), control=control, link_outage_seconds=12)

    wait_for(lambda: link.forwarded > 8 * MiB, 20, "the first bytes")
    link.reset()  # every connection reset (RST)
    wait_for(lambda: link.forwarded > 24 * MiB, 30, "bytes after the reset")
    link.blackhole()
    time.sleep(7)  # past the 4 s of silence that declares the link dead, then reconnects into the void
    during = [p for p in sending.progress if p.phase == "reconnecting"]
    link.restore()

    result = sending.wait(60)
    assert sha256_of(root / "disk.img") == sha256_of(source)
    assert len(result.outages) == 2
    assert result.outages[1] > 2  # from the 4 s of silence to the reconnect after the restore
    assert during and during[-1].outage_seconds is not None and during[-1].outage_seconds > 1
    # Only chunks the receiver did not hold went again: it wrote each chunk once, but for at most one
    # chunk per stream that an old connection's thread finished writing after the resume's answer.
    written = [int(m.group(2)) for r in caplog.records if (m := VERIFIED.search(r.getMessage()))]
    assert written and SIZE <= written[0] <= SIZE + len(result.outages) * STREAMS * limits.DEFAULT_CHUNK_SIZE
    # What was sent again is what was in flight at each cut: far below a restart.
    assert result.bytes_resent < SIZE // 2
    assert result.raw_bytes == SIZE
    print(
        f"outages {[round(o, 1) for o in result.outages]} s; resent {result.bytes_resent / MiB:.1f} MiB "
        f"of {SIZE / MiB:.0f}; receiver wrote {written[0] / MiB:.1f} MiB"
    )
    wait_for(lambda: not outage_server.active_transfers(), 10, "the server's session to end")
    assert not list(root.glob(".disk.img.*"))


def test_a_file_resume_without_the_session_key_is_refused(
    outage_server: DWCPServer, link: Link, root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "disk.img", 24 * MiB)
    control = TransferControl(bandwidth_limit_mbps=32)
    sending = Sending(link, source, ticket("disk.img"), control=control)
    wait_for(lambda: link.forwarded > 2 * MiB, 20, "the first bytes")
    transfer_id = outage_server.active_transfers()[0]
    link.blackhole()
    time.sleep(5)  # both ends have declared the link dead
    forger = Channel.connect(parse_address(outage_server.address_text), SECRET.encode())
    with pytest.raises(TransferRefused, match=r"no transfer .* to resume with that key"):
        negotiate(
            forger, FrameType.RESUME, {"transfer_id": transfer_id, "session_key": "0" * 32, "stream": 0}
        )
    forger.close()
    link.restore()
    sending.wait(60)  # the real sender still resumes
    assert sha256_of(root / "disk.img") == sha256_of(source)


def test_an_outage_above_the_limit_fails_both_ends_and_keeps_the_part_for_a_new_ticket(
    root: Path, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = random_file(tmp_path / "disk.img", 24 * MiB)
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, link_outage_seconds=3
    ) as server:
        relay = Link(server.address)
        control = TransferControl(bandwidth_limit_mbps=32)
        sending = Sending(relay, source, ticket("disk.img"), control=control, link_outage_seconds=3)
        wait_for(lambda: relay.forwarded > 4 * MiB, 20, "the first bytes")
        relay.blackhole()
        started = time.monotonic()
        with pytest.raises(
            TransferInterrupted, match=r"link to node-b down for \d+ s, above the limit of 3 s"
        ):
            sending.wait(30)
        assert time.monotonic() - started < 4 + 3 + 3 + 2  # silence, limit, a reconnect attempt
        assert isinstance(sending.error, TransferInterrupted) and sending.error.code == "link_outage"
        wait_for(lambda: not server.active_transfers(), 3 + 5 + 5, "the server to give the session up")
        relay.close()
        assert not (root / "disk.img").exists()
        assert (root / ".disk.img.dwcp-part").exists() and (root / ".disk.img.dwcp-journal").exists()
        result = send_file(
            source,
            address=server.address_text,
            name="disk.img",
            ticket=ticket("disk.img"),
            secret=SECRET,
            source_node=SOURCE,
            pool=ConnectionPool(tls=None),
        )
    assert result.resumed_bytes >= 2 * MiB
    assert sha256_of(root / "disk.img") == sha256_of(source)
