"""No silent skips in CI: with ``CI=true`` a skipped test fails the run unless ``tests/skips_allowed.toml``
lists it with its reason.

An allow-list entry names a test id, a test file, or a test id before its ``[parameters]``; it covers
every skip under it. CI installs every package the suite drives (``make test``), so a skip for a
missing tool, Chromium, root or a loop device is a failure there, never an entry. Entries that match
no test of a file this run collected are reported as unknown (and fail a CI run: the list must name
real tests); entries whose tests all ran without skipping are reported as stale. Without ``CI=true``
skips pass, and the terminal summary adds one line counting them by reason.

Registered from ``tests/conftest.py``; ``--skips-allowed PATH`` points at another list (the gate's
own tests use it).
"""

from __future__ import annotations

import os
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ALLOW_LIST = Path(__file__).with_name("skips_allowed.toml")


@dataclass(frozen=True)
class Allowed:
    """One allow-list entry: the test (id, file, or id without parameters) and why it may skip."""

    test: str
    reason: str

    def covers(self, nodeid: str) -> bool:
        return nodeid == self.test or nodeid.startswith((f"{self.test}::", f"{self.test}["))

    @property
    def file(self) -> str:
        return self.test.split("::", 1)[0]


@dataclass(frozen=True)
class Skip:
    nodeid: str
    reason: str


def load_allow_list(path: Path) -> list[Allowed]:
    """The entries of ``path``; a missing file is an empty list, a malformed one a usage error."""
    if not path.exists():
        return []
    try:
        entries = tomllib.loads(path.read_text()).get("skip", [])
    except tomllib.TOMLDecodeError as exc:
        raise pytest.UsageError(f"{path}: not valid TOML: {exc}") from exc
    allowed = []
    for number, entry in enumerate(entries, start=1):
        test, reason = entry.get("test"), entry.get("reason")
        if not isinstance(test, str) or not test or not isinstance(reason, str) or not reason.strip():
            raise pytest.UsageError(f"{path}: [[skip]] entry {number} needs a non-empty test and reason")
        allowed.append(Allowed(test, reason.strip()))
    return allowed


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipGate:
    """The plugin instance: collects the run's skips and test ids, decides and reports at the end."""

    def __init__(self, allowed: list[Allowed], *, enforce: bool, rootdir: Path) -> None:
        self.allowed = allowed
        self.enforce = enforce
        self.rootdir = rootdir
        self.skips: list[Skip] = []
        self.known_ids: set[str] = set()
        self.collected_files: set[str] = set()

    # ------------------------------------------------------------------ hooks

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)  # a module-level pytest.skip() arrives here, not as a test report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._know(session.items)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self._know(items)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.failed() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        lines = self.summary()
        if lines:
            terminalreporter.section("skips", red=self.failed(), yellow=not self.failed())
            for line in lines:
                terminalreporter.write_line(line)

    # ---------------------------------------------------------------- verdict

    def unlisted(self) -> list[Skip]:
        return [skip for skip in self.skips if not any(entry.covers(skip.nodeid) for entry in self.allowed)]

    def unknown_entries(self) -> list[Allowed]:
        """Entries naming a file that does not exist, or a test its collected file does not have."""
        return [
            entry
            for entry in self.allowed
            if not (self.rootdir / entry.file).is_file()
            or (
                entry.file in self.collected_files
                and not any(entry.covers(nodeid) for nodeid in self.known_ids)
            )
        ]

    def stale_entries(self) -> list[Allowed]:
        """Entries whose tests ran in this run without one of them skipping."""
        return [
            entry
            for entry in self.allowed
            if any(entry.covers(nodeid) for nodeid in self.known_ids)
            and not any(entry.covers(skip.nodeid) for skip in self.skips)
        ]

    def failed(self) -> bool:
        return self.enforce and bool(self.unlisted() or self.unknown_entries())

    def summary(self) -> list[str]:
        lines = []
        if self.skips:
            by_reason = Counter(skip.reason for skip in self.skips)
            reasons = "; ".join(f"{reason} ({count})" for reason, count in by_reason.most_common())
            lines.append(f"{len(self.skips)} skipped: {reasons}")
        if self.enforce:
            lines += [
                f"CI=true fails on this skip, which {ALLOW_LIST.name} does not list: {skip.nodeid}: {skip.reason}"
                for skip in self.unlisted()
            ]
        lines += [
            f"{ALLOW_LIST.name}: entry {entry.test} names no test; fix or remove it"
            for entry in self.unknown_entries()
        ]
        lines += [
            f"{ALLOW_LIST.name}: entry {entry.test} did not skip in this run; remove it if it no longer skips"
            for entry in self.stale_entries()
        ]
        return lines

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as skipped
            self.skips.append(Skip(report.nodeid, _skip_reason(report)))

    def _know(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.known_ids.add(item.nodeid)
            self.collected_files.add(item.nodeid.split("::", 1)[0])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skips-allowed",
        default=str(ALLOW_LIST),
        help="the allow-list of skips a CI=true run accepts (default: tests/skips_allowed.toml)",
    )


def pytest_configure(config: pytest.Config) -> None:
    allowed = load_allow_list(Path(config.getoption("--skips-allowed")))
    enforce = os.environ.get("CI", "").lower() == "true"
    config.pluginmanager.register(SkipGate(allowed, enforce=enforce, rootdir=config.rootpath), "skip-gate")
