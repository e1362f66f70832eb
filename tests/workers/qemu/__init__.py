"""Tests of the QEMU driver (workers/qemu), against real QEMU."""
