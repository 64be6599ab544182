"""Benchmarks (make bench). Importing src first lets it set the OpenMP wait policy before torch
loads (src/threads.py)."""

import src  # noqa: F401
