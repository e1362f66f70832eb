"""The source's forecast (``workers.node.migration.forecast``) on recorded and on constructed samples.

``fixtures/forecast_*.jsonl`` are the progress snapshots a real source published, one JSON object a
line, recorded by ``NOVACRON_RECORD_FORECAST=1 pytest tests/workers/node/test_migration_forecast.py``
(two node workers, the test guest under TCG, QEMU's downtime limit 2000 ms as under TCG), at a time
when that test limited DWCP's bandwidth rather than shaping the link with tc: a guest rewriting
1 MiB/s of its 32 MiB of random data at 40 Mbit/s (``converging``) and one rewriting 8 MiB/s at
24 Mbit/s with the ``keep`` policy, for six passes (``not_converging``).
Replaying them gives the verdicts and ETAs the source computed, except where the live source had
samples between two published snapshots (it polls every 0.2 s, publishes at most every 0.25 s) and the
guest's zero-page profile (not published).
"""

import itertools
import json
import mmap
import os
import time
from pathlib import Path

from workers.node.migration.forecast import (
    SWITCH_SECONDS,
    ZERO_PAGE_BYTES_PER_SECOND,
    Forecast,
    Forecaster,
    ForecastWatch,
    Sample,
    ram_pages,
)

FIXTURES = Path(__file__).parent / "fixtures"
TCG_LIMIT_SECONDS = 2.0
MIB = float(1 << 20)


def _replay(case: str) -> list[tuple[Sample, Forecast]]:
    forecaster = Forecaster(downtime_limit=TCG_LIMIT_SECONDS)
    lines = (FIXTURES / f"forecast_{case}.jsonl").read_text().splitlines()
    samples = [Sample.from_progress(json.loads(line)) for line in lines]
    return [(sample, forecaster.add(sample)) for sample in samples if sample.at]


def test_a_converging_migration_is_judged_yes_and_its_eta_counts_down():
    replayed = _replay("converging")
    verdicts = [forecast.converging for _, forecast in replayed]
    assert verdicts[0] == "unknown"
    assert "yes" in verdicts and "no" not in verdicts
    # Once known, the verdict stays (decided once per pass).
    assert verdicts[verdicts.index("yes") :] == ["yes"] * (len(verdicts) - verdicts.index("yes"))
    etas = [
        (forecast.dirty_rate is not None, forecast.eta_seconds)
        for _, forecast in replayed
        if forecast.eta_seconds is not None
    ]
    assert len(etas) >= 5
    # No saw tooth: from one snapshot to the next the ETA never rises by more than a few percent (a saw
    # tooth would jump back by a whole pass), except once: when the guest's dirty rate is first measured
    # and the passes after the current one start to count.
    for (known_before, earlier), (known, later) in itertools.pairwise(etas):
        assert later <= earlier * 1.05 or known > known_before, etas
    yes = next(forecast for _, forecast in replayed if forecast.converging == "yes")
    assert "dirty rate" in yes.reason and "MiB/s" in yes.reason and "downtime limit" in yes.reason


def test_a_guest_dirtying_faster_than_the_link_is_judged_no_within_its_second_pass():
    replayed = _replay("not_converging")
    flagged = [(sample, forecast) for sample, forecast in replayed if forecast.converging == "no"]
    assert flagged, [forecast.reason for _, forecast in replayed]
    sample, forecast = flagged[0]
    assert sample.passes <= 2
    assert all(forecast.eta_seconds is None for _, forecast in flagged)  # it would never end by itself
    assert "as fast as the link carries it" in forecast.reason
    # Auto-converge held the guest back for a while (QEMU measured 1-2.8 MiB/s), but its dirty set
    # stayed the same from pass to pass: "no" again, from the sizes themselves.
    stuck = [forecast for _, forecast in flagged if "the dirty set stayed at" in forecast.reason]
    assert stuck and stuck[0].passes <= 4, [(f.passes, f.converging, f.reason) for _, f in replayed][-1]


def _synthetic(effective: float, dirty: float, total: float, limit: float) -> list[Forecast]:
    forecaster = Forecaster(downtime_limit=limit)
    return [forecaster.add(sample) for sample in _samples(effective, dirty, total, limit)]


def _samples(
    effective: float, dirty: float, total: float, limit: float, zero_share: float = 0.0
) -> list[Sample]:
    """A migration as QEMU runs it, sampled every 0.2 s: each pass sends what was dirtied during the
    one before, ``remaining`` drops to zero and jumps back at each sync (the saw tooth of a naive ETA).
    The first pass ends with ``zero_share`` of RAM in zero pages, read at QEMU's rate and sent as
    headers (counted as nothing here)."""
    now, raw, sent, passes = 0.0, 0.0, 0.0, 1
    samples: list[Sample] = []
    size = total
    while True:
        remaining, started = size, now
        zeros = total * zero_share if passes == 1 else 0.0
        while remaining > 0:
            now += 0.2
            budget = 0.2  # seconds of this poll: non-zero pages at the effective rate, then zero pages
            step = min(max(remaining - zeros, 0.0), effective * budget)
            budget -= step / effective
            zero_step = min(max(remaining - step, 0.0), zeros, budget * ZERO_PAGE_BYTES_PER_SECOND)
            zeros -= zero_step
            remaining -= step + zero_step
            raw += step
            sent += step
            sample = Sample(
                at=now,
                phase="memory",
                raw_bytes=raw,
                wire_bytes=raw / 2,  # compression 2
                disk_remaining=0.0,
                memory_total=total,
                memory_remaining=remaining,
                memory_transferred=sent,
                dirty_rate=dirty if passes > 1 else 0.0,
                passes=passes,
                sampled_dirty_rate=dirty if now >= 1.0 else None,  # calc-dirty-rate takes a second
            )
            samples.append(sample)
        size = min(dirty * (now - started), total)
        passes += 1
        if size <= effective * limit or passes > 12:
            return samples


def test_the_eta_does_not_saw_tooth_across_passes():
    # Effective 10 MiB/s, dirty 4 MiB/s: passes of 200, 80, 32, 12.8 MiB, then the switch (limit 0.5 s).
    forecasts = _synthetic(effective=10 * MIB, dirty=4 * MIB, total=200 * MIB, limit=0.5)
    known = [
        (forecast.dirty_rate is not None, forecast.eta_seconds)
        for forecast in forecasts
        if forecast.eta_seconds is not None
    ]
    assert forecasts[-1].converging == "yes"
    # A naive remaining/rate estimate falls to ~0 at the end of each pass and jumps back up; this one only
    # ever counts down (at most a small rise when QEMU's new measurement lands), except once: the
    # passes to come are counted from the moment the guest's dirty rate is first measured.
    rises = [
        later - earlier
        for (known_before, earlier), (known_now, later) in itertools.pairwise(known)
        if later > earlier and known_now == known_before
    ]
    assert max(rises, default=0.0) < 1.0, rises
    assert sum(1 for (before, _), (now, _) in itertools.pairwise(known) if now != before) == 1
    true_total = len(forecasts) * 0.2
    at_half = forecasts[len(forecasts) // 2].eta_seconds
    assert at_half is not None and abs(at_half - true_total / 2) / (true_total / 2) < 0.25, (
        at_half,
        true_total,
    )


def test_the_eta_holds_within_15_percent_at_a_quarter_half_and_three_quarters_of_a_mostly_zero_guest():
    # 1 GiB guest, 30 % of it data (the first pass then reads 700 MiB of zero pages), 40 MiB/s effective,
    # dirtying 4 MiB/s, QEMU's limit 2 s as under TCG: one pass, then the dirty set sent paused.
    total, effective, dirty, limit = 1024 * MIB, 40 * MIB, 4 * MIB, 2.0
    samples = _samples(effective, dirty, total, limit, zero_share=0.7)
    forecaster = Forecaster(downtime_limit=limit)
    forecaster.ram_profile = tuple(index < 0.3 * 4096 for index in range(4096))
    forecasts = [forecaster.add(sample) for sample in samples]
    first_pass = samples[-1].at
    end = first_pass + dirty * first_pass / effective + SWITCH_SECONDS  # the paused last pass, the switch
    for mark in (0.25, 0.5, 0.75):
        index = max(i for i, sample in enumerate(samples) if sample.at <= mark * end)
        eta, truth = forecasts[index].eta_seconds, end - samples[index].at
        assert eta is not None and abs(eta - truth) / truth < 0.15, (mark, eta, truth)


def test_an_eta_is_published_at_the_first_poll_of_the_memory_stream():
    # The baseline as QEMU starts (no RAM figures yet), then one poll: a rate and an ETA at once, the
    # passes to come not counted until the guest's dirty rate is measured.
    forecaster = Forecaster(downtime_limit=2.0)
    start = Sample(
        at=10.0, phase="memory", raw_bytes=5e5, wire_bytes=2e5, disk_remaining=0.0, memory_total=64 * MIB
    )
    assert forecaster.add(start).eta_seconds is None
    first = Sample(
        at=10.2,
        phase="memory",
        raw_bytes=5e5 + 2 * MIB,
        wire_bytes=2e5 + MIB,
        disk_remaining=0.0,
        memory_total=64 * MIB,
        memory_remaining=62 * MIB,
        memory_transferred=2 * MIB,
        passes=1,
    )
    forecast = forecaster.add(first)
    assert forecast.converging == "unknown" and forecast.dirty_rate is None
    assert forecast.eta_seconds is not None and abs(forecast.eta_seconds - (6.2 + SWITCH_SECONDS)) < 0.01


def test_the_watch_asks_to_publish_the_first_eta_at_once():
    watch = ForecastWatch(lambda forecast: None, downtime_limit=2.0)
    flags = []
    for sample in _samples(effective=10 * MIB, dirty=MIB, total=20 * MIB, limit=2.0)[:4]:
        fields = watch.add(sample)
        flags.append((fields["eta_seconds"] != "", watch.publish_now))
    # The first sample has no rate yet; the second gives the first ETA, published without waiting.
    assert flags == [(False, False), (True, True), (True, False), (True, False)], flags


def test_the_pages_seen_changing_in_the_first_pass_win_over_the_one_second_sample():
    forecaster = Forecaster(downtime_limit=2.0)
    sample = Sample(
        at=1.0,
        phase="memory",
        raw_bytes=MIB,
        wire_bytes=MIB,
        disk_remaining=0.0,
        memory_total=64 * MIB,
        memory_remaining=63 * MIB,
        passes=1,
        sampled_dirty_rate=8 * MIB,
        first_pass_dirty_rate=3 * MIB,
    )
    assert forecaster.add(sample).dirty_rate == 3 * MIB
    assert Sample.from_progress(sample.progress_fields() | {"updated": 1.0}).first_pass_dirty_rate == 3 * MIB


def test_the_watch_counts_the_guest_pages_changed_since_the_memory_stream_began():
    # A 7 MiB anonymous mapping of this process stands for the guest's RAM (read through /proc/PID/mem
    # as QEMU's is); a quarter of it is rewritten after the stream began.
    memory_mb = 7
    ram = mmap.mmap(-1, memory_mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ram.madvise(mmap.MADV_DONTFORK)  # its own mapping (rw-p, as QEMU's RAM), not merged into a neighbour
    ram.write(os.urandom(memory_mb << 19))  # the first half holds data, the rest is zero pages
    watch = ForecastWatch(lambda forecast: None, downtime_limit=2.0)
    watch.profile_ram(os.getpid(), memory_mb)
    assert 0.45 < sum(watch.forecaster.ram_profile) / len(watch.forecaster.ram_profile) < 0.55
    began = time.monotonic()
    watch.memory_started(float(memory_mb << 20))
    ram.seek(0)
    ram.write(os.urandom(memory_mb << 18))
    time.sleep(0.6)
    fields = watch.memory({"total": memory_mb << 20, "remaining": memory_mb << 19, "dirty-sync-count": 1})
    elapsed = time.monotonic() - began
    expected = (memory_mb << 18) / elapsed
    assert 0.8 * expected < fields["first_pass_dirty_rate"] < 1.25 * expected, (fields, expected)
    assert len(ram_pages(os.getpid(), memory_mb)) == len(watch.forecaster.ram_profile)
    ram.close()


def test_dirtying_as_fast_as_the_link_is_no_and_unknown_comes_first():
    forecasts = _synthetic(effective=4 * MIB, dirty=5 * MIB, total=64 * MIB, limit=0.5)
    assert forecasts[0].converging == "unknown"
    assert forecasts[-1].converging == "no"
    first_no = next(forecast for forecast in forecasts if forecast.converging == "no")
    assert first_no.passes <= 2 and first_no.eta_seconds is None
    assert "dirty rate 5.0 MiB/s" in first_no.reason


def test_the_watch_reports_a_change_of_verdict_and_each_pass_while_no():
    reports: list[Forecast] = []
    watch = ForecastWatch(reports.append, downtime_limit=0.5)
    for sample in _samples(effective=4 * MIB, dirty=5 * MIB, total=64 * MIB, limit=0.5):
        fields = watch.add(sample)
    assert [report.converging for report in reports] == ["no"] * len(reports)
    passes = [report.passes for report in reports]
    assert passes == list(range(passes[0], passes[0] + len(reports))) and passes[0] <= 2
    assert fields["converging"] == "no" and fields["eta_seconds"] == ""
    assert fields["tunnel_raw_bytes"] > fields["tunnel_wire_bytes"] > 0
