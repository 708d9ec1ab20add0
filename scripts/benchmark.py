"""Alias of `python benchmarks/benchmark.py` (the benchmarks live in benchmarks/), same arguments."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
    os.execv(sys.executable, [sys.executable, str(target), *sys.argv[1:]])
