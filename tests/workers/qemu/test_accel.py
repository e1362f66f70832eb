"""The accelerator setting and the KVM probe: the payload is right, the probe is bounded and cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from workers.qemu.accel import (
    Accelerator,
    AcceleratorSetting,
    cached_probe_kvm,
    probe_kvm,
    resolve_accelerator,
    run_probe_guest,
)
from workers.qemu.tools import QemuTools

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def tools() -> QemuTools:
    return QemuTools.locate()


def test_the_probe_guest_completes_under_tcg(tools: QemuTools):
    # The reference run: the same payload must finish under TCG, or a KVM verdict would mean nothing.
    usable, reason = run_probe_guest(tools, Accelerator.TCG, cpu_model="max", timeout=10)
    assert usable, reason


@pytest.mark.parametrize("cpu_model", ["host", "qemu64"])
def test_the_kvm_probe_answers_within_its_timeout(tools: QemuTools, cpu_model: str):
    timeout = 1.0
    started = time.monotonic()
    result = probe_kvm(tools, cpu_model=cpu_model, timeout=timeout)
    elapsed = time.monotonic() - started
    print(
        f"\nKVM probe with -cpu {cpu_model}: usable={result.kvm_usable} in {elapsed:.2f} s: {result.reason}"
    )
    assert elapsed < timeout + 1.5
    assert result.reason
    assert result.cpu_model == cpu_model


def test_the_probe_result_is_cached_per_node_until_its_inputs_change(tools: QemuTools, tmp_path: Path):
    cache = tmp_path / "accel-probe.json"
    first = cached_probe_kvm(tools, cache, cpu_model="host", timeout=2)
    assert json.loads(cache.read_text())["kvm_usable"] is first.kvm_usable
    written = cache.stat()
    assert cached_probe_kvm(tools, cache, cpu_model="host", timeout=2) == first
    # No probe ran: a probe writes its result to a new file that replaces the cache.
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    other = cached_probe_kvm(tools, cache, cpu_model="host,-arch-capabilities", timeout=1)
    assert other.cpu_model == "host,-arch-capabilities"
    assert json.loads(cache.read_text())["cpu_model"] == "host,-arch-capabilities"


def test_an_explicit_tcg_setting_never_probes(tools: QemuTools, tmp_path: Path):
    cache = tmp_path / "accel-probe.json"
    assert resolve_accelerator(AcceleratorSetting.TCG, tools, cache) is Accelerator.TCG
    assert not cache.exists()


def test_auto_follows_the_probe(tools: QemuTools, tmp_path: Path):
    cache = tmp_path / "accel-probe.json"
    chosen = resolve_accelerator(AcceleratorSetting.AUTO, tools, cache, timeout=2)
    verdict = json.loads(cache.read_text())["kvm_usable"]
    assert chosen is (Accelerator.KVM if verdict else Accelerator.TCG)
