"""bench-dwcp's tables: medians over runs, and ratios as medians of the per-run ratios."""

from __future__ import annotations

from bench.dwcp.bench import Link, Measurement, median_measurement, table

MB = 10**6


def measurement(tool: str, wall: float, wire: int = 100 * MB) -> Measurement:
    return Measurement(tool, wall, 100 * MB, wire, cpu=wall / 2, peak_rss_kib=1024 * int(wall))


def test_one_row_per_tool_holds_the_median_run_and_the_largest_rss() -> None:
    row = median_measurement([measurement("nc", 3.0), measurement("nc", 1.0), measurement("nc", 2.0)])
    assert row.wall == 2.0
    assert row.cpu == 1.0
    assert row.peak_rss_kib == 3 * 1024


def test_ratios_are_taken_run_by_run_so_a_slow_moment_hits_both_tools() -> None:
    runs = [
        [measurement("nc", 1.0), measurement("dwcp auto x4", 0.5, wire=40 * MB)],
        [measurement("nc", 4.0), measurement("dwcp auto x4", 2.0, wire=40 * MB)],  # the machine was busy
        [measurement("nc", 1.0), measurement("dwcp auto x4", 0.4, wire=40 * MB)],
    ]
    text = table(Link("veth 1gbit", "1gbit", False), "mixed", runs)
    dwcp = next(line for line in text.splitlines() if line.startswith("dwcp"))
    assert "0.50 (0.40-2.00)" in dwcp  # median wall and its range
    assert "2.00x (2.00-2.50)" in dwcp  # per-run ratios to nc: 2.0, 2.0, 2.5
    assert "3 runs" in text
