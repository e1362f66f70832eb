"""The forecast's ETA in ``make bench-migration``: what it said at 25, 50 and 75 % of each NovaCron run.

An :class:`EtaRecorder` subscribes to every migration's events channel before the run is requested
(its id is known only after), keeps each progress snapshot's ``eta_seconds`` with its ``updated`` stamp,
and once the run ended compares, at each mark, the last ETA given by then with the time that really
remained (to ``finished_at``, when the control plane recorded the completion). The error is
``(eta - true) / true`` in percent: positive when the forecast was pessimistic.
"""

import json
import statistics
import threading
from typing import Any

import redis

from workers import contract

MARKS = (25, 50, 75)  # percent of the run's wall time, request to completion


class EtaRecorder:
    """Every ETA the source publishes while it runs (a pattern subscription, on its own thread)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(contract.MIGRATION_EVENTS_CHANNEL.format(id="*"))
        self.snapshots: list[tuple[str, dict[str, Any]]] = []  # (channel, progress snapshot)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if not message or message["type"] != "pmessage":
                continue
            body = json.loads(message["data"])
            if "event" not in body:  # the control side's status changes carry no forecast
                self.snapshots.append((message["channel"].decode(), body))

    def stop(self, migration_id: str) -> list[dict[str, Any]]:
        """Stop listening; the progress snapshots that migration's source published."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.pubsub.close()
        self.client.close()
        channel = contract.MIGRATION_EVENTS_CHANNEL.format(id=migration_id)
        return [body for name, body in self.snapshots if name == channel]


def given(snapshots: list[dict[str, Any]], requested_at: float) -> list[tuple[float, float, str]]:
    """The ETAs among the snapshots: (seconds since the request, ETA, phase)."""
    return [
        (round(body["updated"] - requested_at, 2), round(body["eta_seconds"], 2), str(body.get("phase", "")))
        for body in snapshots
        if isinstance(body.get("eta_seconds"), (int, float)) and isinstance(body.get("updated"), (int, float))
    ]


def errors(etas: list[tuple[float, float, str]], duration: float) -> dict[str, float | None]:
    """The error in percent at each mark of a run that lasted ``duration`` seconds (None: no ETA yet)."""
    found: dict[str, float | None] = {}
    for mark in MARKS:
        before = [(at, eta) for at, eta, _ in etas if at <= mark / 100 * duration]
        if not before:
            found[str(mark)] = None
            continue
        at, eta = before[-1]
        truth = duration - at
        found[str(mark)] = round(100 * (eta - truth) / truth, 1) if truth > 0 else None
    return found


def distribution(runs: list[dict[str, Any]], mark: str | None = None) -> dict[str, float | None]:
    """Median and largest absolute error (percent) over runs, at one mark or all of them."""
    marks = [mark] if mark else [str(m) for m in MARKS]
    values = [
        run["eta_error_pct"][m]
        for run in runs
        for m in marks
        if run.get("eta_error_pct", {}).get(m) is not None
    ]
    if not values:
        return {"median": None, "max_abs": None}
    return {
        "median": round(statistics.median(values), 1),
        "max_abs": round(max(abs(value) for value in values), 1),
    }
