"""The report of ``make bench-migration`` (``bench/migration/table.py``) and its configuration lists:
links, the guest pause's parts, the rows side by side with their ratios, targets and notes, the JSON."""

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from bench.migration.run import NATIVE_VARIANTS
from bench.migration.table import NOVACRON, link_rate, links, pause_parts, report, rows, table


def novacron_run(total: float, pause: float, link_mb: float) -> dict[str, Any]:
    return {
        "total_seconds": total,
        "downtime_ms": pause,
        "last_pass_ms": pause * 0.4,
        "switch_ms": pause * 0.6,
        "memory_check_ms": pause * 0.5,
        "qemu_downtime_ms": pause * 0.4,
        "network_outage_ms": pause + 50,
        "link_bytes": int(link_mb * 1e6),
        "eta_error_pct": {"25": 10.0, "50": -5.0, "75": 20.0},
    }


def qemu_run(total: float, pause: float, link_mb: float) -> dict[str, Any]:
    return {
        "completed": True,
        "total_seconds": total,
        "downtime_ms": pause,
        "last_pass_ms": pause - 10,
        "switch_ms": 10.0,
        "qemu_downtime_ms": pause - 20,
        "link_bytes": int(link_mb * 1e6),
    }


def test_a_link_is_a_tc_rate_or_unshaped() -> None:
    assert link_rate("1gbit") == "1gbit"
    assert link_rate("100mbit") == "100mbit"
    assert link_rate("unshaped") is None
    assert links("1gbit, 100mbit,unshaped") == ["1gbit", "100mbit", "unshaped"]
    for bad in ("fast", "0mbit", "1 gbit", "100mb", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            links(bad)


def test_qemu_alone_runs_its_strongest_configurations_beside_the_plain_ones() -> None:
    assert {"default", "cap lifted", "multifd x4", "cap lifted + auto-converge"} <= set(NATIVE_VARIANTS)
    compressed = {name: options for name, options in NATIVE_VARIANTS.items() if options.get("compression")}
    assert {options["compression"] for options in compressed.values()} == {"zstd", "zlib"}
    assert all(options["multifd"] and options["lift"] for options in compressed.values())
    assert NATIVE_VARIANTS["default"]["lift"] is False


def test_the_pause_is_the_last_pass_and_the_switch() -> None:
    parts = pause_parts(1000.0, 1000.25, 1000.625)
    assert parts == {"pause_ms": 625.0, "last_pass_ms": 250.0, "switch_ms": 375.0}
    missing = pause_parts(1000.0, None, 1000.5)
    assert missing == {"pause_ms": 500.0, "last_pass_ms": None, "switch_ms": None}


def test_novacron_is_ranked_against_the_best_qemu_configuration_that_completed() -> None:
    ours = {"1gbit": [novacron_run(4.0, 600, 160), novacron_run(5.0, 500, 170), novacron_run(3.0, 700, 165)]}
    native = {
        "1gbit": {
            "default": [{"completed": False, "gave_up_after_seconds": 120}],
            "multifd x4 + zstd": [qemu_run(2.5, 120, 300), qemu_run(3.5, 100, 310)],
            "multifd x4 + zlib": [{"completed": False, "unsupported": "zlib: not built in"}],
            "cap lifted": [qemu_run(6.0, 90, 360)],
        }
    }
    found = {row["method"]: row for row in rows("1gbit", "testguest", ours, native)}
    assert list(found) == [
        NOVACRON,
        "QEMU default",
        "QEMU multifd x4 + zstd",
        "QEMU multifd x4 + zlib",
        "QEMU cap lifted",
    ]
    mine = found[NOVACRON]
    assert (mine["runs"], mine["total_seconds"], mine["total_range"]) == (3, 4.0, "3-5")
    assert (mine["downtime_ms"], mine["downtime_range"], mine["last_pass_ms"], mine["switch_ms"]) == (
        600,
        "500-700",
        240,
        360,
    )
    assert mine["link_mb"] == 165.0
    assert (mine["eta_error_median_pct"], mine["eta_error_max_abs_pct"]) == (10.0, 20.0)
    # The best QEMU-alone median is zstd's 3.0 s: NovaCron's 4.0 s is 1.33x, over the 0.8x target.
    assert mine["total_vs_best_native"] == 1.33
    assert (mine["target"], mine["target_met"]) == (0.8, False)
    assert found["QEMU multifd x4 + zstd"]["total_vs_best_native"] == 1.0
    assert found["QEMU cap lifted"]["total_vs_best_native"] == 2.0
    assert "target" not in found["QEMU cap lifted"]
    gave_up, refused = found["QEMU default"], found["QEMU multifd x4 + zlib"]
    assert (gave_up["runs"], gave_up["tried"], gave_up["total_seconds"]) == (0, 1, None)
    assert gave_up["note"] == "1/1 did not converge in 120 s"
    assert refused["note"] == "refused by this QEMU: zlib: not built in"


def test_the_target_is_half_over_100_mbit_and_parity_on_the_unshaped_link() -> None:
    for link, target, met in (("100mbit", 0.5, True), ("unshaped", 1.0, True)):
        ours = {link: [novacron_run(10.0, 1000, 120)]}
        native = {link: {"multifd x4": [qemu_run(40.0, 900, 560)]}}
        mine = rows(link, "testguest", ours, native)[0]
        assert (mine["total_vs_best_native"], mine["target"], mine["target_met"]) == (0.25, target, met)


def test_without_a_completed_qemu_run_there_is_no_ratio() -> None:
    ours = {"100mbit": [novacron_run(10.0, 1000, 120)]}
    native = {"100mbit": {"default": [{"completed": False, "gave_up_after_seconds": 120}]}}
    mine = rows("100mbit", "testguest", ours, native)[0]
    assert (mine["total_vs_best_native"], mine["target_met"]) == (None, None)


def test_the_table_puts_every_configuration_on_its_own_line_with_why_it_has_no_figures() -> None:
    ours = {"unshaped": [novacron_run(4.0, 600, 160)]}
    native = {
        "unshaped": {
            "default": [{"completed": False, "gave_up_after_seconds": 120}],
            "multifd x4": [qemu_run(3.0, 100, 360)],
        }
    }
    lines = table(rows("unshaped", "testguest", ours, native)).splitlines()
    assert lines[0].split()[:4] == ["link", "guest", "method", "runs"]
    body = [line for line in lines[2:] if line.startswith("unshaped")]
    assert [line.split()[2:4] for line in body] == [
        ["NovaCron", "(DWCP)"],
        ["QEMU", "default"],
        ["QEMU", "multifd"],
    ]
    assert "(1/1 did not converge in 120 s)" in lines[4]
    assert body[0].split()[-14:-10] == ["1.33", "1.0", "False", "600"]


def test_the_report_writes_every_run_and_row_under_the_given_directory(tmp_path: Path, capsys: Any) -> None:
    ours = {"1gbit": [novacron_run(4.0, 600, 160)]}
    native = {"1gbit": {"multifd x4 + zstd": [qemu_run(3.0, 100, 300)]}}
    args = argparse.Namespace(links=["1gbit"], runs=1)
    path = report(args, [("testguest", ours, native)], out=tmp_path)
    document = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("migration-")
    assert document["args"] == {"links": ["1gbit"], "runs": 1}
    assert document["novacron"] == ours and document["qemu"] == native
    assert [row["method"] for row in document["rows"]] == [NOVACRON, "QEMU multifd x4 + zstd"]
    printed = capsys.readouterr().out
    assert "QEMU multifd x4 + zstd" in printed and f"results: {path}" in printed
