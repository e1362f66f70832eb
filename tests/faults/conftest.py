"""Fault-injection scenarios: a real cluster, one fault, then the invariant NovaCron promises.

Every test here gets the node tests' ``cluster`` (control worker with beat, two node workers, the
test guest under TCG) with a short migration stall timeout, and a ``fault`` recorder: the test says
what it did and what it checked, marks the moment the fault was injected and the moment the
invariant held again. Every ``faults`` test writes one JSON record to ``artifacts/faults/`` once it
has been torn down, whatever happened (a setup that failed writes a failed record), from which
``python -m tests.faults.report`` renders ``docs/RELIABILITY.md``.
"""

import json
import os
import time
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.faults.invariants import FAULT_STALL_TIMEOUT
from tests.faults.redis_server import cluster_redis_url, private_redis  # noqa: F401 - fixtures
from tests.workers.node.conftest import cluster, cluster_hosts, guest_image, test_guest  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "faults"
# One pytest process is one run: the report renders only records of a single run.
RUN = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    # A stalled migration is failed after this many seconds (production: 120) so that scenarios
    # which depend on the watchdog end within the test's budget.
    return {"MIGRATION_STALL_TIMEOUT": str(FAULT_STALL_TIMEOUT)}


class FaultRecord:
    """What one scenario did, what it checked, and how long the system took to recover.

    ``injected()`` is called right after the fault hit (the kill returned, the cut was made),
    ``recovered()`` when the test first saw the system settled again; a scenario that injects the
    fault repeatedly pairs them once per round and reports its slowest recovery.
    """

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id
        self.scenario = ""
        self.action = ""
        self.invariant = ""
        self.notes: list[str] = []
        self.injected_at: float | None = None
        self.recoveries: list[float] = []

    def describe(self, *, scenario: str, action: str, invariant: str) -> None:
        self.scenario, self.action, self.invariant = scenario, action, invariant

    def injected(self) -> None:
        self.injected_at = time.monotonic()

    def recovered(self) -> None:
        assert self.injected_at is not None, "recovered() before the fault was injected"
        self.recoveries.append(time.monotonic() - self.injected_at)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def recovery_seconds(self) -> float | None:
        return round(max(self.recoveries), 3) if self.recoveries else None


RECORD = pytest.StashKey[FaultRecord]()
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> FaultRecord:
    record = FaultRecord(request.node.nodeid)
    request.node.stash[RECORD] = record
    return record


def _outcome(reports: dict[str, pytest.TestReport]) -> tuple[str, str]:
    """The scenario's result and, when it did not pass, why (the first phase that went wrong)."""
    for when in ("setup", "call", "teardown"):  # a failed or skipped setup has no call
        report = reports.get(when)
        if report is not None and report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            return "skipped", str(reason)
        if report is not None and report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            return "failed", f"{when}: {crash.message if crash is not None else report.longrepr}"
    return "passed", ""


def _write_record(item: pytest.Item, reports: dict[str, pytest.TestReport]) -> None:
    record = item.stash.get(RECORD, None) or FaultRecord(item.nodeid)
    result, failure = _outcome(reports)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{item.name.replace('/', '_')}.json").write_text(
        json.dumps(
            {
                "test": item.nodeid,
                "run": RUN,
                "scenario": record.scenario,
                "action": record.action,
                "invariant": record.invariant,
                "result": result,
                "failure": failure[:2000],
                "recovery_seconds": record.recovery_seconds,
                "test_seconds": round(sum(report.duration for report in reports.values()), 1),
                "notes": record.notes,
                "finished_at": time.time(),
                "host": os.uname().nodename,
            },
            indent=2,
        )
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if item.get_closest_marker("faults") is not None:
        reports = item.stash.setdefault(REPORTS, {})
        reports[report.when] = report
        if report.when == "teardown":
            _write_record(item, reports)
    return report
