"""Tests of the test guest builder, the guest itself and its QEMU harness (console and guest channel)."""
