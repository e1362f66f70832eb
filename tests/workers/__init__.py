"""Tests of the node side (workers/)."""
