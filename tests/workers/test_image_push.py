"""The image push's progress steps: every IMAGE_PROGRESS_STEP percent, or after a quiet interval."""

import time

from workers import contract
from workers.dwcp import Progress
from workers.image_push import StepReporter


def _progress(raw_bytes: int) -> Progress:
    return Progress(
        transfer_id="t",
        phase="transferring",
        raw_bytes=raw_bytes,
        wire_bytes=raw_bytes,
        total_bytes=1000,
        elapsed_seconds=1.0,
        rate_bytes_per_second=1.0,
        eta_seconds=None,
    )


def test_steps_are_reported_once_each_and_never_the_end():
    steps: list[float] = []
    reporter = StepReporter(1000, steps.append)
    for raw in (50, 99, 100, 150, 420, 430, 999, 1000):
        reporter.report(_progress(raw))
    assert steps == [10.0, 42.0, 99.9]


def test_a_slow_push_reports_after_a_quiet_interval():
    steps: list[float] = []
    reporter = StepReporter(1000, steps.append)
    reporter.report(_progress(10))
    assert steps == []
    reporter.last = time.monotonic() - contract.IMAGE_PROGRESS_INTERVAL
    reporter.report(_progress(20))
    assert steps == [2.0]
