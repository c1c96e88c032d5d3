"""Benchmarks: scripts that print figures (never run or timed by CI)."""
