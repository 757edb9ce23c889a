"""Throughput measured, not guessed: `python -m harness.bench` parts and the device check."""
