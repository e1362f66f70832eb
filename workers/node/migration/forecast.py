"""The source's forecast of a live migration: its remaining time and whether its pre-copy converges.

Sans-I/O: :class:`Forecaster` takes one :class:`Sample` per progress poll (QMP figures and the DWCP
tunnels' raw and wire byte counters) and returns a :class:`Forecast`; :class:`ForecastWatch` binds it
to a migration (tunnel reporters in, progress fields and verdict reports out).

Model. The link rate is the wire bytes/s over the last ``WINDOW_SECONDS``, the compression ratio the
raw/wire bytes over the same window, the effective rate their product (raw bytes the link carries per
second). QEMU's RAM migration is a series of passes: each sends what the guest dirtied during the one
before, and QEMU switches over once what is left fits its downtime limit at its measured bandwidth.
The current pass's remainder is its non-zero pages at the effective rate and its zero pages (a header
each) at the rate QEMU reads them; the non-zero share comes, in the first pass, from a profile of the
guest's RAM, later from what the pass sent so far. The next pass is ``dirty rate x the current pass's
whole duration`` (at most the guest's RAM), sent at the effective rate; passes are predicted until one
fits the limit (sent with the guest paused). The remaining time is the disk mirror's remainder, the
current pass, the predicted passes and the switch. The dirty rate is, by preference, QEMU's own (one
per sync), the profiled pages seen changing since the first pass began (per second: QEMU's measure),
QMP ``calc-dirty-rate``'s one-second sample.

Invariants:
  - The verdict is ``unknown`` until the guest's dirty rate is known (QMP ``calc-dirty-rate`` sampled
    during the disk phase, then QEMU's own at each sync) and the link was watched for
    ``MIN_SPAN_SECONDS``; it is decided once per pass (at its start, or as soon as both are known),
    never between two: it cannot flicker.
  - ``no`` when the dirty rate is at least the effective rate less ``MARGIN``, when more than
    ``MAX_PASSES`` would be needed, or when the dirty set at ``STUCK_PASSES`` pass starts in a row did
    not shrink (QEMU's dirty rate counts distinct pages since its last sync: a small working set
    rewritten fast looks slow, its pass sizes do not).
  - The ETA is ``None`` until the link was measured (one poll of the memory stream at the latest), and
    while the verdict is ``no`` (it would never end by itself). Until the dirty rate is measured the
    passes after the current one count as empty (at most the downtime limit's worth).

Why the ETA does not saw-tooth: a naive ``remaining / rate`` drops towards zero at the end of every
pass and jumps back at the next sync. Here the prediction includes the passes still to come, so a sync
moves figures from "predicted" to "current" without changing the total much; the rates are differences
of cumulative counters over a fixed window (one late sample moves them by its share of the window, not
by its own jitter); and what is smoothed is the predicted *finish time*: the published one is the median
of the predictions of the last ``FINISH_WINDOW_SECONDS`` (restarted with a new phase and when the dirty
rate is first known: the one upward step the ETA takes by design). A correct prediction is a constant
finish time, so the ETA counts down one second per second; one outlying sample cannot move a median
(half the window must agree), and a real change (the link speeding up, the guest dirtying more) is
followed within half the window, where an EWMA would still carry a share of every early error.
"""

import logging
import os
import statistics
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers import contract
from workers.dwcp import Progress
from workers.qemu import QemuError
from workers.qemu.memory import ram_mapping

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 2.0  # the link rate's window: 10 DWCP progress ticks, short enough to follow a ramp-up
# The ETA's rate is the effective rate over a longer window: a short migration's whole first pass, whose
# length is what the ETA predicts (the 2 s rate swung 2x with the tunnel's codec and the shared CPUs),
# and still one that forgets a link cut within seconds.
ETA_WINDOW_SECONDS = 5.0
MIN_SPAN_SECONDS = 0.6  # a rate over less than this is noise for the verdict (a burst filling buffers)
FIRST_ETA_SPAN_SECONDS = 0.15  # the ETA's first rate: one poll (0.2 s) after the memory stream started
FINISH_WINDOW_SECONDS = 1.0  # the predicted finish times whose median is published (5 polls)
DIRTY_SMOOTHING = 0.5  # EWMA weight of a new dirty-rate measurement (one per QEMU sync)
MARGIN = 0.1  # "converging" needs an effective rate at least 10 % above the dirty rate
MAX_PASSES = 30  # more predicted passes than this is "no": each pass costs a full round of the dirty set
STUCK_PASSES = 2  # this many pass starts in a row whose dirty set did not shrink: "no"
SWITCH_SECONDS = 0.3  # the switch around QEMU's last pass (mirror end, resume): measured 0.1-0.5 s
# QEMU finds a zero page by reading it and sends only a header: a 1 GiB guest's 700 MiB of zero pages
# took 0.25-0.45 s on the bench's two-core machine under TCG (1.5-2.8 GB/s; lower bounds: 0.2-0.4 s polls).
ZERO_PAGE_BYTES_PER_SECOND = float(2 << 30)
MEBI = float(1 << 20)
PAGE = 4096
RAM_PROFILE_SAMPLES = 4096  # pages read before the migration: the zero share within about +-1.5 %
# The same pages are read again during the first pass, at most this often, to count those the guest
# changed since the memory stream started (a few ms of reads and CRCs each time).
DIRTY_SAMPLE_SECONDS = 0.5
ZERO_PAGE_CRC = zlib.crc32(bytes(PAGE))


@dataclass(frozen=True)
class Sample:
    """One progress poll of the source. Byte counts are cumulative except the ``*_remaining``."""

    at: float  # monotonic seconds
    phase: contract.ProgressPhase
    raw_bytes: float  # into the DWCP tunnels (both), since the migration started
    wire_bytes: float  # on the wire (both tunnels)
    disk_remaining: float
    memory_total: float
    memory_remaining: float = 0.0  # QEMU's ram.remaining of the current pass (memory phase)
    memory_transferred: float = 0.0  # QEMU's ram.transferred (non-zero pages and headers)
    dirty_rate: float = 0.0  # bytes/s, QEMU's dirty-pages-rate x page size (0 before its first sync)
    passes: int = 0  # QEMU's dirty-sync-count: 1 during the first pass
    sampled_dirty_rate: float | None = None  # bytes/s, QMP calc-dirty-rate's (None: not measured yet)
    first_pass_dirty_rate: float | None = None  # bytes/s, the sampled pages changed during the first pass

    def progress_fields(self) -> dict[str, Any]:
        """The inputs a progress snapshot carries besides the QMP figures it already has."""
        return (
            {
                "tunnel_raw_bytes": self.raw_bytes,
                "tunnel_wire_bytes": self.wire_bytes,
                "memory_transferred": self.memory_transferred,
                "memory_passes": self.passes,
            }
            | ({} if self.sampled_dirty_rate is None else {"sampled_dirty_rate": self.sampled_dirty_rate})
            | (
                {}
                if self.first_pass_dirty_rate is None
                else {"first_pass_dirty_rate": self.first_pass_dirty_rate}
            )
        )

    @classmethod
    def from_progress(cls, snapshot: dict[str, Any]) -> "Sample":
        """The sample a published snapshot was made from (``updated`` as its time): to replay one."""

        def figure(name: str) -> float:
            try:
                return float(snapshot.get(name) or 0)
            except (TypeError, ValueError):
                return 0.0

        return cls(
            at=figure("updated"),
            phase="memory" if snapshot.get("phase") == "memory" else "disk",
            raw_bytes=figure("tunnel_raw_bytes"),
            wire_bytes=figure("tunnel_wire_bytes"),
            disk_remaining=figure("disk_remaining"),
            memory_total=figure("memory_total"),
            memory_remaining=figure("memory_remaining"),
            memory_transferred=figure("memory_transferred"),
            dirty_rate=figure("dirty_rate"),
            passes=int(figure("memory_passes")),
            sampled_dirty_rate=figure("sampled_dirty_rate") if "sampled_dirty_rate" in snapshot else None,
            first_pass_dirty_rate=(
                figure("first_pass_dirty_rate") if "first_pass_dirty_rate" in snapshot else None
            ),
        )


@dataclass(frozen=True)
class Forecast:
    eta_seconds: float | None  # the whole migration's remaining time
    phase_eta_seconds: float | None  # the current phase's (disk: the mirror; memory: the current pass)
    converging: contract.Converging
    reason: str
    link_rate: float | None = None  # wire bytes/s
    compression: float | None = None  # raw / wire
    dirty_rate: float | None = None  # bytes/s, smoothed
    passes: int = 0

    def progress_fields(self) -> dict[str, Any]:
        """The fields of ``contract.MigrationProgress`` this forecast sets ("" clears an unknown)."""
        return {
            "eta_seconds": "" if self.eta_seconds is None else round(self.eta_seconds, 2),
            "phase_eta_seconds": "" if self.phase_eta_seconds is None else round(self.phase_eta_seconds, 2),
            "converging": self.converging,
            "converging_reason": self.reason,
            "link_rate_bps": "" if self.link_rate is None else round(self.link_rate * 8),
            "compression_ratio": "" if self.compression is None else round(self.compression, 3),
        }


@dataclass
class _Pass:
    number: int
    started: float
    start_size: float  # QEMU's remaining at the sync that began it
    transferred: float  # QEMU's transferred then
    drained: float  # pages processed so far (bytes) then


@dataclass
class Forecaster:
    """Turns samples into forecasts; ``downtime_limit`` is QEMU's (seconds), set before the memory phase."""

    downtime_limit: float
    window: deque[Sample] = field(default_factory=deque)
    dirty_rate: float | None = None  # QEMU's own measurements (one per sync), smoothed
    sampled_dirty_rate: float | None = None  # QMP calc-dirty-rate's, before QEMU's first sync
    first_pass_dirty_rate: float | None = None  # the guest's pages changed during the first pass, per second
    ram_profile: tuple[bool, ...] = ()  # whether each of evenly spaced guest pages is non-zero, in RAM order
    verdict: contract.Converging = "unknown"
    reason: str = "waiting for enough samples of the link"
    finishes: deque[tuple[float, float]] = field(default_factory=deque)  # (when, predicted finish)
    passes: list[_Pass] = field(default_factory=list)
    drained: float = 0.0  # memory pages processed, all passes (bytes)
    last: Sample | None = None
    decided_at: int = 0  # the pass whose start last decided the verdict
    smoothed_model: str = ""  # the phase of the finish time being smoothed, and whether the passes count

    def add(self, sample: Sample) -> Forecast:
        self._track(sample)
        link_rate, compression = self._link(MIN_SPAN_SECONDS)
        effective = link_rate * compression if link_rate is not None and compression is not None else None
        if sample.phase == "memory" and self.passes and self.passes[-1].number != self.decided_at:
            self._decide(sample, effective)
        eta_rate, eta_compression = self._link(FIRST_ETA_SPAN_SECONDS, ETA_WINDOW_SECONDS)
        eta_effective = eta_rate * eta_compression if eta_rate is not None and eta_compression else None
        eta, phase_eta = self._eta(sample, eta_effective)
        if self.verdict == "no":
            eta = None
        smoothed = self._smooth(sample.at, f"{sample.phase}/{self.guest_dirty_rate is not None}", eta)
        return Forecast(
            eta_seconds=smoothed,
            phase_eta_seconds=phase_eta,
            converging=self.verdict,
            reason=self.reason,
            link_rate=link_rate,
            compression=compression,
            dirty_rate=self.guest_dirty_rate,
            passes=sample.passes,
        )

    @property
    def guest_dirty_rate(self) -> float | None:
        """QEMU's measurement once it has one, else the pages seen changing during the first pass, else
        the sampled one taken before the memory phase."""
        for rate in (self.dirty_rate, self.first_pass_dirty_rate, self.sampled_dirty_rate):
            if rate is not None:
                return rate
        return None

    def _track(self, sample: Sample) -> None:
        if sample.sampled_dirty_rate is not None:
            self.sampled_dirty_rate = sample.sampled_dirty_rate
        if sample.first_pass_dirty_rate is not None:
            self.first_pass_dirty_rate = sample.first_pass_dirty_rate
        if self.window and (
            self.window[-1].phase != sample.phase or sample.at - self.window[-1].at > WINDOW_SECONDS
        ):
            # The memory stream fills the link at once; the mirror's tail before it may have idled. And
            # a gap in the samples (QMP blocked while QEMU holds its lock) is not a measure of the link.
            self.window.clear()
        # Before the first byte the link is not measured, only idle; the memory stream fills it at once
        # (its first sample is taken as QEMU starts it).
        if sample.wire_bytes > 0 or sample.phase == "memory":
            self.window.append(sample)
        while len(self.window) > 2 and sample.at - self.window[1].at >= ETA_WINDOW_SECONDS:
            self.window.popleft()
        previous, self.last = self.last, sample
        if sample.phase != "memory" or sample.passes < 1:  # QEMU's setup: no RAM figures yet
            return
        if previous is not None and previous.phase == "memory" and previous.passes >= 1:
            self.drained += max(previous.memory_remaining - sample.memory_remaining, 0.0)
        if not self.passes or sample.passes > self.passes[-1].number:
            self.passes.append(
                _Pass(
                    sample.passes, sample.at, sample.memory_remaining, sample.memory_transferred, self.drained
                )
            )
            if sample.dirty_rate > 0 and sample.passes > 1:  # a new measurement: one per sync
                self.dirty_rate = (
                    sample.dirty_rate
                    if self.dirty_rate is None
                    else DIRTY_SMOOTHING * sample.dirty_rate + (1 - DIRTY_SMOOTHING) * self.dirty_rate
                )

    def _link(
        self, min_span: float = MIN_SPAN_SECONDS, horizon: float = WINDOW_SECONDS
    ) -> tuple[float | None, float | None]:
        """Wire bytes/s and the compression ratio over the last ``horizon`` seconds of the window (None:
        they span less than ``min_span``)."""
        if len(self.window) < 2:
            return None, None
        last, first = self.window[-1], self.window[0]
        for older in self.window:  # from the newest sample at least ``horizon`` old
            if last.at - older.at < horizon:
                break
            first = older
        span = last.at - first.at
        wire = last.wire_bytes - first.wire_bytes
        if span < min_span or wire <= 0:
            return None, None
        raw = last.raw_bytes - first.raw_bytes
        return wire / span, max(raw / wire, 1.0 / 64)

    def _decide(self, sample: Sample, effective: float | None) -> None:
        """The verdict at a pass boundary (see the module's invariants)."""
        dirty_rate = self.guest_dirty_rate
        if dirty_rate is None or effective is None:
            self.reason = "waiting for a measurement of the guest's dirty rate and of the link"
            return
        self.decided_at = self.passes[-1].number
        limit_bytes = effective * self.downtime_limit
        figures = (
            f"dirty rate {dirty_rate / MEBI:.1f} MiB/s, effective rate {effective / MEBI:.1f} MiB/s "
            f"(link {effective / self._compression_or_one() / MEBI:.1f} MiB/s x compression "
            f"{self._compression_or_one():.2f})"
        )
        sizes = [p.start_size for p in self.passes[1:]]  # the first pass is all of RAM
        stuck = len(sizes) >= STUCK_PASSES and all(
            later >= earlier * 0.95 and later > limit_bytes
            for earlier, later in zip(sizes[-STUCK_PASSES:], sizes[-STUCK_PASSES + 1 :], strict=False)
        )
        if dirty_rate * (1 + MARGIN) >= effective:
            self.verdict = "no"
            self.reason = f"{figures}: the guest dirties memory as fast as the link carries it"
        elif stuck:
            self.verdict = "no"
            self.reason = (
                f"{figures}: the dirty set stayed at {sizes[-1] / MEBI:.1f} MiB for {STUCK_PASSES} passes, "
                f"above the {limit_bytes / MEBI:.1f} MiB the downtime limit allows"
            )
        else:
            needed = self._passes_needed(self._current_pass_seconds(sample, effective), effective)
            if needed is None:
                self.verdict = "no"
                self.reason = f"{figures}: more than {MAX_PASSES} passes would be needed"
            else:
                self.verdict = "yes"
                self.reason = (
                    f"{figures}: about {needed} more pass(es) until the dirty set fits the "
                    f"{self.downtime_limit * 1000:.0f} ms downtime limit ({limit_bytes / MEBI:.1f} MiB)"
                )

    def _compression_or_one(self) -> float:
        return self._link()[1] or 1.0

    def _passes_needed(self, current_seconds: float, effective: float) -> int | None:
        """Passes after the current one until one fits the downtime limit (None: more than MAX_PASSES)."""
        sizes = self._future_passes(current_seconds, effective)
        return len(sizes) if sizes[-1] <= effective * self.downtime_limit else None

    def _future_passes(self, current_seconds: float, effective: float) -> list[float]:
        """Sizes of the passes after the current one (which ends in ``current_seconds``), the last of
        which fits the limit (bounded). Each is what the guest dirties while the one before is sent."""
        rate = self.guest_dirty_rate or 0.0
        total = self.last.memory_total if self.last is not None else 0.0
        current = self.passes[-1] if self.passes else None
        elapsed = (self.last.at - current.started) if current is not None and self.last is not None else 0.0
        size = min(rate * (elapsed + current_seconds), total)
        sizes: list[float] = []
        while size > effective * self.downtime_limit and len(sizes) < MAX_PASSES:
            sizes.append(size)
            size = min(rate * size / effective, total)
        sizes.append(size)
        return sizes

    def _eta(self, sample: Sample, effective: float | None) -> tuple[float | None, float | None]:
        """The whole migration's remaining time and the current phase's.

        Until the guest's dirty rate is measured the passes after the current one count as empty:
        what they add is at most the downtime limit's worth (the guest's last pass), where waiting for
        the measurement (a second) would leave the first part of a short migration without an ETA.
        """
        if effective is None or effective <= 0:
            return None, None
        if sample.phase == "disk":
            disk = sample.disk_remaining / effective
            # The first memory pass: its non-zero pages (all of RAM without a profile).
            share = self._profile_share() if self.ram_profile else 1.0
            memory = _pass_seconds(sample.memory_total, share, effective)
            later = sum(self._future_passes(memory, effective)) / effective  # dirtied from its start
            return disk + memory + later + SWITCH_SECONDS, disk
        if not self.passes:
            return None, None
        current = self._current_pass_seconds(sample, effective)
        sizes = self._future_passes(current, effective)
        if sizes[-1] > effective * self.downtime_limit:  # it does not converge: no end to predict
            return None, current
        return current + sum(sizes) / effective + SWITCH_SECONDS, current

    def _current_pass_seconds(self, sample: Sample, effective: float) -> float:
        """The current pass's remainder: its non-zero pages at the effective rate, its zero pages at
        the rate QEMU reads them (a zero page costs a header on the wire).

        In the first pass the non-zero share is the RAM profile's over the part still to send (QEMU
        scans RAM in address order: the tail); later passes, and a first pass without a profile,
        take the share seen so far in the pass (dirtied pages are rarely zero).
        """
        current = self.passes[-1]
        if current.number <= 1 and self.ram_profile:
            share = self._profile_share(sample)
        else:
            drained = self.drained - current.drained
            sent = sample.memory_transferred - current.transferred
            share = min(sent / drained, 1.0) if drained >= MEBI else 1.0
        return _pass_seconds(sample.memory_remaining, share, effective)

    def _profile_share(self, sample: Sample | None = None) -> float:
        """The non-zero share of the RAM still to send in the first pass (all of it without a sample)."""
        profile = self.ram_profile
        if sample is None or not sample.memory_total:
            tail = profile
        else:
            fraction = min(sample.memory_remaining / sample.memory_total, 1.0)
            tail = profile[len(profile) - max(round(len(profile) * fraction), 1) :]
        return sum(tail) / len(tail) if tail else 1.0

    def _smooth(self, now: float, model: str, eta: float | None) -> float | None:
        # A new phase, or the passes to come counted once the dirty rate is known, is a new model: its
        # first prediction is published at once rather than blended in over the window.
        if model != self.smoothed_model or eta is None:
            self.finishes.clear()
            self.smoothed_model = model
        if eta is None:
            return None
        self.finishes.append((now, now + eta))
        while now - self.finishes[0][0] > FINISH_WINDOW_SECONDS:
            self.finishes.popleft()
        return max(statistics.median(finish for _, finish in self.finishes) - now, 0.0)


def _pass_seconds(size: float, share: float, effective: float) -> float:
    """The time QEMU takes to send ``size`` bytes of RAM of which ``share`` are non-zero pages."""
    return size * share / effective + size * (1 - share) / ZERO_PAGE_BYTES_PER_SECOND


class ForecastWatch:
    """A migration's forecast on the source: fed by the tunnels and the QMP polls, read by the publisher.

    ``on_verdict(forecast)`` is called when the verdict changes, and at every new pass while it is
    ``no`` (the control plane's policy counts passes).
    """

    def __init__(self, on_verdict: Callable[[Forecast], None], downtime_limit: float = 0.1) -> None:
        self.forecaster = Forecaster(downtime_limit=downtime_limit)
        self.on_verdict = on_verdict
        self._tunnels: dict[str, tuple[int, int]] = {}
        self._outages: dict[str, float | None] = {}  # per tunnel: seconds its link has been cut
        self._lock = threading.Lock()
        self._reported: tuple[contract.Converging, int] = ("unknown", 0)
        self._sampled: float | None = None
        self._guest: tuple[int, int] | None = None  # QEMU's pid and the guest's MiB, once profiled
        self._pages: tuple[float, tuple[int, ...]] | None = None  # (when, CRCs) as the memory stream began
        self._first_pass_dirty_rate: float | None = None
        self._dirty_read_at = 0.0
        self.publish_now = False  # the last sample changed the verdict or gave the first ETA: publish it
        self._eta_given = False

    @property
    def wants_sampled_dirty_rate(self) -> bool:
        return self._sampled is None and self.forecaster.dirty_rate is None

    def sampled_dirty_rate(self, bytes_per_second: float) -> None:
        self._sampled = bytes_per_second

    def profile_ram(self, pid: int | None, memory_mb: int) -> None:
        """Read a page every ``memory / RAM_PROFILE_SAMPLES`` of the running guest's RAM (``/proc/PID/mem``,
        as the memory check does): which are zero. Without access the forecast does without."""
        if pid is None:
            return
        try:
            self.forecaster.ram_profile = _profile(ram_pages(pid, memory_mb))
        except (QemuError, OSError) as exc:
            logger.info("guest RAM not profiled for the forecast: %s", exc)
            return
        self._guest = (pid, memory_mb)

    def memory_started(self, memory_total: float) -> dict[str, Any]:
        """As QEMU starts the memory stream: the tunnels' counters (the first rate is measured from
        here) and the profiled pages' CRCs (QEMU's dirty tracking starts now: a page changed since
        is in its next pass)."""
        if self._guest is not None:
            try:
                crcs = ram_pages(*self._guest)
            except (QemuError, OSError) as exc:
                logger.info("guest RAM not sampled for its dirty set: %s", exc)
            else:
                self.forecaster.ram_profile = _profile(crcs)
                self._pages = (time.monotonic(), crcs)
        return self.memory({"total": memory_total, "remaining": memory_total})

    def _sample_dirty_pages(self, passes: int) -> None:
        """During the first pass: the share of the profiled pages changed since it began, per second."""
        now = time.monotonic()
        if self._pages is None or self._guest is None or passes != 1:
            return
        began, crcs = self._pages
        if now - max(began, self._dirty_read_at) < DIRTY_SAMPLE_SECONDS:
            return
        self._dirty_read_at = now
        try:
            current = ram_pages(*self._guest)
        except (QemuError, OSError) as exc:
            logger.info("guest RAM not sampled for its dirty set: %s", exc)
            self._pages = None
            return
        changed = sum(1 for old, new in zip(crcs, current, strict=True) if old != new)
        self._first_pass_dirty_rate = changed / len(crcs) * (self._guest[1] << 20) / (now - began)

    def tunnel_reporter(self, name: str) -> "TunnelCounter":
        return TunnelCounter(self, name)

    def count(self, name: str, progress: Progress) -> None:
        with self._lock:
            self._tunnels[name] = (progress.raw_bytes, progress.wire_bytes)
            self._outages[name] = progress.outage_seconds if progress.phase == "reconnecting" else None

    def link_fields(self) -> dict[str, Any]:
        """``link``: up, or reconnecting with ``outage_seconds`` (the longest cut of the tunnels)."""
        with self._lock:
            outages = [seconds for seconds in self._outages.values() if seconds is not None]
        if not outages:
            return {"link": "up", "outage_seconds": 0}
        return {"link": "reconnecting", "outage_seconds": max(outages)}

    def _bytes(self) -> tuple[float, float]:
        with self._lock:
            return (
                float(sum(raw for raw, _ in self._tunnels.values())),
                float(sum(wire for _, wire in self._tunnels.values())),
            )

    def disk(self, *, remaining: float, memory_total: float) -> dict[str, Any]:
        raw, wire = self._bytes()
        sample = Sample(
            time.monotonic(), "disk", raw, wire, remaining, memory_total, sampled_dirty_rate=self._sampled
        )
        return self.add(sample)

    def memory(self, ram: dict[str, Any]) -> dict[str, Any]:
        self._sample_dirty_pages(int(ram.get("dirty-sync-count", 0)))
        raw, wire = self._bytes()
        sample = Sample(
            at=time.monotonic(),
            phase="memory",
            raw_bytes=raw,
            wire_bytes=wire,
            disk_remaining=0.0,
            memory_total=float(ram.get("total", 0)),
            memory_remaining=float(ram.get("remaining", 0)),
            memory_transferred=float(ram.get("transferred", 0)),
            dirty_rate=float(ram.get("dirty-pages-rate", 0)) * float(ram.get("page-size", 4096)),
            passes=int(ram.get("dirty-sync-count", 0)),
            sampled_dirty_rate=self._sampled,
            first_pass_dirty_rate=self._first_pass_dirty_rate,
        )
        return self.add(sample)

    def add(self, sample: Sample) -> dict[str, Any]:
        forecast = self.forecaster.add(sample)
        reported = (forecast.converging, forecast.passes if forecast.converging == "no" else 0)
        first_eta = forecast.eta_seconds is not None and not self._eta_given
        self._eta_given = self._eta_given or first_eta
        self.publish_now = first_eta or (
            forecast.converging != "unknown" and reported[0] != self._reported[0]
        )
        if forecast.converging != "unknown" and reported != self._reported:
            self._reported = reported
            try:
                self.on_verdict(forecast)
            except Exception:  # a report that cannot be sent must not stop the migration
                logger.exception("forecast verdict not reported")
        return sample.progress_fields() | forecast.progress_fields() | self.link_fields()


def ram_pages(pid: int, memory_mb: int, samples: int = RAM_PROFILE_SAMPLES) -> tuple[int, ...]:
    """The CRC32 of each of ``samples`` evenly spaced pages of QEMU ``pid``'s guest RAM."""
    start, size = ram_mapping(pid, memory_mb), memory_mb << 20
    stride = max(size // samples // PAGE, 1) * PAGE
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        return tuple(
            zlib.crc32(os.pread(memory.fileno(), PAGE, start + offset)) for offset in range(0, size, stride)
        )


def _profile(crcs: tuple[int, ...]) -> tuple[bool, ...]:
    """Which pages hold anything (a CRC other than a zero page's: a collision is one in 2^32)."""
    return tuple(crc != ZERO_PAGE_CRC for crc in crcs)


@dataclass
class TunnelCounter:
    """A DWCP ``Reporter`` that hands one tunnel's byte counters to its watch."""

    watch: ForecastWatch
    name: str

    def report(self, progress: Progress) -> None:
        self.watch.count(self.name, progress)
