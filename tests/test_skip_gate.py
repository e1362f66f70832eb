"""The skip gate (tests/skip_gate.py) in a real pytest run over a tiny generated suite, with and without CI."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="needs a frobnicator")
def test_needs_a_tool():
    pass

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_variant(backend):
    if backend == "sqlite":
        pytest.skip("SQLite-only variant")

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    raise AssertionError
"""


def run_pytest(tmp_path: Path, *, ci: bool, allow_list: str) -> subprocess.CompletedProcess[str]:
    """Run pytest with only the gate as a plugin on ``SUITE``; its exit code and output."""
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    allowed = tmp_path / "allowed.toml"
    allowed.write_text(textwrap.dedent(allow_list))
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env |= {"PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"} | ({"CI": "true"} if ci else {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.skip_gate", f"--skips-allowed={allowed}", "-p",
         "no:cacheprovider", "test_suite.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


VARIANT_ALLOWED = """
    [[skip]]
    test = "test_suite.py::test_variant"
    reason = "SQLite-only variant"
"""
TOOL_ALLOWED = """
    [[skip]]
    test = "test_suite.py::test_needs_a_tool"
    reason = "the frobnicator is not packaged for Debian"
"""


def test_a_developer_run_passes_with_skips_and_says_why(tmp_path: Path):
    result = run_pytest(tmp_path, ci=False, allow_list="")
    assert result.returncode == 0, result.stdout
    assert "2 skipped: needs a frobnicator (1); SQLite-only variant (1)" in result.stdout
    assert "CI=true fails" not in result.stdout


def test_ci_fails_on_each_unlisted_skip_and_names_it_with_its_reason(tmp_path: Path):
    result = run_pytest(tmp_path, ci=True, allow_list=VARIANT_ALLOWED)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "does not list: test_suite.py::test_needs_a_tool: needs a frobnicator" in result.stdout
    assert "test_variant" not in result.stdout.split("skips ===")[1]  # listed: accepted silently


def test_ci_passes_when_every_skip_is_listed_and_ignores_xfail(tmp_path: Path):
    result = run_pytest(tmp_path, ci=True, allow_list=VARIANT_ALLOWED + TOOL_ALLOWED)
    assert result.returncode == 0, result.stdout
    assert "1 xfailed" in result.stdout


def test_an_entry_naming_no_test_fails_ci_and_one_that_did_not_skip_is_reported(tmp_path: Path):
    odd_entries = """
    [[skip]]
    test = "test_suite.py::test_renamed_long_ago"
    reason = "gone"

    [[skip]]
    test = "test_suite.py::test_passes"
    reason = "skipped once"
    """
    result = run_pytest(tmp_path, ci=True, allow_list=VARIANT_ALLOWED + TOOL_ALLOWED + odd_entries)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "entry test_suite.py::test_renamed_long_ago names no test" in result.stdout
    assert "entry test_suite.py::test_passes did not skip in this run" in result.stdout


def test_a_malformed_allow_list_is_a_usage_error_not_a_crash(tmp_path: Path):
    result = run_pytest(tmp_path, ci=True, allow_list='[[skip]]\ntest = "test_suite.py"\n')
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "needs a non-empty test and reason" in result.stderr
