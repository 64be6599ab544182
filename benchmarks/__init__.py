"""Benchmarks (make bench). Importing src first lets it bound OpenMP's spin-wait before torch
loads (src/threads.py)."""

import src  # noqa: F401
