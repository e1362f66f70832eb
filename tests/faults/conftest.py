"""Fault-injection scenarios: a real cluster, one fault, then the invariant NovaCron promises.

Every test here gets the node tests' ``cluster`` (control worker with beat, two node workers, the
test guest under TCG) with a short migration stall timeout, and a ``fault`` recorder: the test says
what it did and what it checked, marks when the fault was injected and when the system had
recovered; the recorder writes one JSON file per test to ``artifacts/faults/``, from which
``python -m tests.faults.report`` renders ``docs/RELIABILITY.md``.
"""

import json
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.invariants import FAULT_STALL_TIMEOUT
from tests.faults.redis_server import cluster_redis_url, private_redis  # noqa: F401 - fixtures
from tests.workers.node.conftest import cluster, guest_image, test_guest  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "faults"


@pytest.fixture
def cluster_extra_env() -> dict[str, str]:
    # A stalled migration is failed after this many seconds (production: 120) so that scenarios
    # which depend on the watchdog end within the test's budget.
    return {"MIGRATION_STALL_TIMEOUT": str(FAULT_STALL_TIMEOUT)}


class FaultRecord:
    """What one scenario did, what it checked, and how long the system took to recover."""

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id
        self.scenario = ""
        self.action = ""
        self.invariant = ""
        self.notes: list[str] = []
        self.injected_at: float | None = None
        self.recovered_at: float | None = None

    def describe(self, *, scenario: str, action: str, invariant: str) -> None:
        self.scenario, self.action, self.invariant = scenario, action, invariant

    def injected(self) -> None:
        self.injected_at = time.monotonic()

    def recovered(self) -> None:
        self.recovered_at = time.monotonic()

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def recovery_seconds(self) -> float | None:
        if self.injected_at is None or self.recovered_at is None:
            return None
        return round(self.recovered_at - self.injected_at, 1)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> Iterator[FaultRecord]:
    record = FaultRecord(request.node.nodeid)
    started = time.monotonic()
    yield record
    call = getattr(request.node, "report_call", None)
    if call is None:
        result = "error"
    elif call.passed:
        result = "passed"
    elif call.skipped:
        result = "skipped"
    else:
        result = "failed"
    detail = ""
    if call is not None and call.failed:
        detail = str(
            call.longrepr.reprcrash.message if hasattr(call.longrepr, "reprcrash") else call.longrepr
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = request.node.name.replace("/", "_")
    (ARTIFACTS / f"{name}.json").write_text(
        json.dumps(
            {
                "test": record.test_id,
                "scenario": record.scenario,
                "action": record.action,
                "invariant": record.invariant,
                "result": result,
                "failure": detail[:2000],
                "recovery_seconds": record.recovery_seconds,
                "test_seconds": round(time.monotonic() - started, 1),
                "notes": record.notes,
                "finished_at": time.time(),
                "host": os.uname().nodename,
            },
            indent=2,
        )
    )
