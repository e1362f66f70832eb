"""The report of ``make bench-migration``: per link, NovaCron beside each QEMU-alone configuration.

Pure functions over the runs as ``run.py`` records them (dicts; no QEMU, no Django): medians and
min-max ranges, the guest pause split into its parts, each total's ratio to the best QEMU-alone total
on the same link with the issue's target for it, the printed tables and the JSON file under
``bench/results/``. Invariants: a configuration without a completed run still gets its row, saying why
(did not converge, refused by this QEMU), never a silent gap; ratios are to the best median of the
QEMU-alone configurations that completed on that link.
"""

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.migration.eta import MARKS, distribution

ROOT = Path(__file__).resolve().parents[2]
UNSHAPED = "unshaped"  # the A<->B veth with no tc limit: as fast as the machine moves bytes
SHAPED = re.compile(r"^[1-9]\d*(kbit|mbit|gbit)$")  # a tc tbf rate
# Issue 24: NovaCron's total at most this times the best QEMU-alone total on the same link; 1.0 elsewhere.
TARGETS = {"100mbit": 0.5, "1gbit": 0.8}
NOVACRON = "NovaCron (DWCP)"

Runs = list[dict[str, Any]]
Section = tuple[str, dict[str, Runs], dict[str, dict[str, Runs]]]  # guest, NovaCron's runs, QEMU's


def link_rate(link: str) -> str | None:
    """The ``tc`` rate of a ``--links`` entry ("1gbit", "100mbit"), None for "unshaped"."""
    if link == UNSHAPED:
        return None
    if not SHAPED.match(link):
        raise ValueError(f"link {link!r}: a tc rate such as 1gbit or 100mbit, or {UNSHAPED!r}")
    return link


def links(text: str) -> list[str]:
    """``--links``: comma-separated, each a tc rate or "unshaped" (argparse reports a bad one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no link given")
    for name in names:
        try:
            link_rate(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def spread(values: list[float | None]) -> str:
    """``min-max`` of the values present, for the table beside the median."""
    present = [value for value in values if value is not None]
    return f"{min(present):g}-{max(present):g}" if present else "-"


def pause_parts(
    stopped: float | None, completed: float | None, resumed: float | None
) -> dict[str, float | None]:
    """The guest's pause and its parts in ms, from event timestamps (epoch seconds, one clock):
    ``last_pass_ms`` source ``STOP`` -> the source's migration ``completed`` (the disk mirror's end and
    QEMU's last RAM pass), ``switch_ms`` from there -> the destination's ``RESUME`` (NovaCron's memory
    check falls in it). A part whose ends are not both known is None."""

    def between(start: float | None, end: float | None) -> float | None:
        return round((end - start) * 1000, 1) if start is not None and end is not None else None

    return {
        "pause_ms": between(stopped, resumed),
        "last_pass_ms": between(stopped, completed),
        "switch_ms": between(completed, resumed),
    }


def _why_missing(runs: Runs) -> str:
    """What kept runs from completing, for the table's note."""
    reasons = []
    refused = [run["unsupported"] for run in runs if run.get("unsupported")]
    if refused:
        reasons.append(f"refused by this QEMU: {refused[0]}")
    gave_up = [run for run in runs if "gave_up_after_seconds" in run]
    if gave_up:
        reasons.append(
            f"{len(gave_up)}/{len(runs)} did not converge in {gave_up[0]['gave_up_after_seconds']:g} s"
        )
    return "; ".join(reasons)


def _summary(runs: Runs) -> dict[str, Any]:
    """Medians and ranges of the completed runs of one method (None and "-" where there are none)."""
    return {
        "total_seconds": median([r["total_seconds"] for r in runs]),
        "total_range": spread([r["total_seconds"] for r in runs]),
        "downtime_ms": median([r["downtime_ms"] for r in runs]),
        "downtime_range": spread([r["downtime_ms"] for r in runs]),
        "last_pass_ms": median([r.get("last_pass_ms") for r in runs]),
        "switch_ms": median([r.get("switch_ms") for r in runs]),
        "memory_check_ms": median([r.get("memory_check_ms") for r in runs]),
        "qemu_downtime_ms": median([r.get("qemu_downtime_ms") for r in runs]),
        "network_outage_ms": median([r.get("network_outage_ms") for r in runs]),
        "network_outage_range": spread([r.get("network_outage_ms") for r in runs]),
        "link_mb": median([r["link_bytes"] / 1e6 for r in runs]),
        "eta_error_median_pct": distribution(runs)["median"],
        "eta_error_max_abs_pct": distribution(runs)["max_abs"],
        # Debian: runs after which the guest's workload went on writing files at the destination.
        "workload_went_on": f"{sum(r['workload_went_on'] for r in runs)}/{len(runs)}"
        if runs and "workload_went_on" in runs[0]
        else "-",
    }


def rows(
    link: str, guest: str, ours: dict[str, Runs], native: dict[str, dict[str, Runs]]
) -> list[dict[str, Any]]:
    """One guest's rows on one link: NovaCron's, then each QEMU-alone configuration's (one with no
    completed run says why); medians and ranges, the total's ratio to the best QEMU-alone median and,
    for NovaCron, the target and whether it was met."""
    methods = {NOVACRON: ours.get(link, [])} | {
        f"QEMU {name}": runs for name, runs in native.get(link, {}).items()
    }
    found: list[dict[str, Any]] = []
    for name, runs in methods.items():
        if not runs:
            continue
        completed = [run for run in runs if run.get("completed", True)]
        summary = _summary(completed)
        found.append(
            {"link": link, "guest": guest, "method": name, "runs": len(completed), "tried": len(runs)}
            | summary
            | {"note": _why_missing(runs)}
        )
    best = min(
        (row["total_seconds"] for row in found if row["method"] != NOVACRON and row["total_seconds"]),
        default=None,
    )
    for row in found:
        ratio = round(row["total_seconds"] / best, 2) if best and row["total_seconds"] else None
        row["total_vs_best_native"] = ratio
        if row["method"] == NOVACRON:
            row["target"] = TARGETS.get(link, 1.0)
            row["target_met"] = None if ratio is None else ratio <= row["target"]
    return found


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


COLUMNS = (  # (heading, row key, width)
    ("link", "link", 9),
    ("guest", "guest", 9),
    ("method", "method", 31),
    ("runs", "runs", 4),
    ("total s", "total_seconds", 8),
    ("range", "total_range", 13),
    ("x best", "total_vs_best_native", 6),
    ("target", "target", 6),
    ("met", "target_met", 5),
    ("pause ms", "downtime_ms", 8),
    ("range", "downtime_range", 15),
    ("last pass", "last_pass_ms", 9),
    ("switch", "switch_ms", 8),
    ("mem check", "memory_check_ms", 9),
    ("QEMU dt", "qemu_downtime_ms", 7),
    ("net out", "network_outage_ms", 8),
    ("link MB", "link_mb", 8),
    ("went on", "workload_went_on", 7),
    ("ETA %", "eta_error_median_pct", 6),
    ("max|%|", "eta_error_max_abs_pct", 6),
)


def table(found: list[dict[str, Any]]) -> str:
    """The side-by-side table of rows (from :func:`rows`); a row's note follows it on its own line."""
    left = {"link", "guest", "method"}

    def line(cells: list[str]) -> str:
        return " ".join(
            f"{cell:<{width}}" if key in left else f"{cell:>{width}}"
            for cell, (_, key, width) in zip(cells, COLUMNS, strict=True)
        )

    header = line([heading for heading, _, _ in COLUMNS])
    out = [header, "-" * len(header)]
    for row in found:
        out.append(line([_cell(row.get(key)) for _, key, _ in COLUMNS]))
        if row.get("note"):
            out.append(f"{'':<9} {'':<9}   ({row['note']})")
    return "\n".join(out)


LEGEND = (
    "(medians and min-max ranges over the completed runs; 'x best' = total / the best QEMU-alone median on the"
    " link, 'target' the issue's limit for NovaCron's; pause = source QMP STOP -> destination RESUME, made of"
    " 'last pass' (STOP -> the source's migration completed: mirror end and QEMU's last RAM pass) and 'switch'"
    " (-> destination RESUME), which holds NovaCron's 'mem check'; 'QEMU dt' = QEMU's own downtime figure;"
    " 'net out' = the longest gap between replies to a client pinging the guest every 10 ms from the nodes'"
    " LAN; 'link MB' counts both directions; 'went on' = Debian runs after which its workload wrote more"
    " files at the destination; 'ETA %' = the forecast's error at 25/50/75 % of each NovaCron run, median and"
    " largest absolute, see --help)"
)


def eta_table(link_names: list[str], sections: list[Section]) -> str:
    """The forecast's error at each mark, per link and guest: median and largest absolute, in percent."""
    out = [
        "ETA error of NovaCron's forecast, (ETA - true remaining) / true remaining, in %:",
        f"{'link':<9} {'guest':<9} {'runs':>4} "
        + " ".join(f"{f'at {m} %: median':>16} {'max |%|':>7}" for m in MARKS),
    ]
    for link in link_names:
        for guest, ours, _ in sections:
            runs = ours.get(link, [])
            if not runs:
                continue
            cells = []
            for mark in MARKS:
                at_mark = distribution(runs, str(mark))
                cells.append(f"{at_mark['median']!s:>16} {at_mark['max_abs']!s:>7}")
            out.append(f"{link:<9} {guest:<9} {len(runs):>4} " + " ".join(cells))
    return "\n".join(out)


def cold_table(link_names: list[str], sections: list[Section]) -> str:
    """Cold migrations of the test guest beside a plain DWCP send of its disk ("" when none ran)."""
    cold = [
        (link, run)
        for link in link_names
        for guest, ours, _ in sections
        if guest == "testguest"
        for run in ours.get(f"{link} cold", [])
    ]
    if not cold:
        return ""
    out = [
        "cold migration of the stopped VM against a plain DWCP file transfer of its disk, same link:",
        f"{'link':<9} {'disk MB':>8} {'cold s':>8} {'dwcp send s':>12} {'cold / send':>12} {'on link MB':>11}",
    ]
    for link, run in cold:
        ratio = (
            round(run["total_seconds"] / run["dwcp_send_seconds"], 2) if run["dwcp_send_seconds"] else None
        )
        out.append(
            f"{link:<9} {run['disk_bytes'] / 1e6:8.1f} {run['total_seconds']!s:>8} "
            f"{run['dwcp_send_seconds']!s:>12} {ratio!s:>12} {run['link_bytes'] / 1e6:11.1f}"
        )
    return "\n".join(out)


def git_commit() -> str:
    """The short commit the result file belongs to ("unknown" outside a git checkout)."""
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def report(args: argparse.Namespace, sections: list[Section], out: Path = ROOT / "bench" / "results") -> Path:
    """Print the tables (per link, each guest's NovaCron row beside its QEMU-alone rows) and write the
    JSON file; its path."""
    found = [
        row
        for link in args.links
        for guest, ours, native in sections
        for row in rows(link, guest, ours, native)
    ]
    print("\n" + table(found) + "\n" + LEGEND)
    print("\n" + eta_table(args.links, sections))
    if cold := cold_table(args.links, sections):
        print("\n" + cold)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"migration-{time.strftime('%Y%m%d-%H%M%S')}-{git_commit()}.json"
    document: dict[str, Any] = {"args": vars(args), "rows": found}
    for guest, ours, native in sections:
        # The test guest's runs under "novacron" and "qemu" as before; the Debian guest's under "debian".
        if guest == "testguest":
            document |= {"novacron": ours, "qemu": native}
        else:
            document[guest] = {"novacron": ours, "qemu": native}
    path.write_text(json.dumps(document, indent=2))
    print(f"results: {path}")
    return path
