"""Benchmarks (not tests): each module's ``run() -> list[Row]`` measures side by side in one process."""
