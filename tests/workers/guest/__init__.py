"""Tests of the test guest builder and its QEMU console harness."""
