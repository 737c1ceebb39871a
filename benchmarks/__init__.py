"""Benchmarks: scripts run as ``python -m benchmarks.<name>``; each writes JSON and a markdown table."""
