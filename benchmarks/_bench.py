"""What the benchmark scripts share (a library, not a script): one command line per benchmark, the same
alone (``python benchmarks/bench_decode.py ...``) and as a sub-command of ``benchmarks/benchmark.py``, and the
fixed-width tables they print."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bench:
    """A benchmark: ``name`` is its sub-command of benchmarks/benchmark.py, ``doc`` its long description (the
    script's docstring), ``add_args`` declares its options on a parser, ``run`` takes the parsed options."""

    name: str
    help: str
    doc: str | None
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]

    def parser(self, p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
        """``p`` (default: a new parser for the script alone) with this benchmark's options and ``func``."""
        if p is None:
            p = argparse.ArgumentParser(
                description=self.doc, formatter_class=argparse.RawDescriptionHelpFormatter
            )
        self.add_args(p)
        p.set_defaults(func=self.run)
        return p

    def register(self, sub: argparse._SubParsersAction) -> None:
        """Add this benchmark as a sub-command (``--help`` shows the same description as the script alone)."""
        p = sub.add_parser(
            self.name,
            help=self.help,
            description=self.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.parser(p)

    def main(self, argv: list[str] | None = None) -> Any:
        return self.run(self.parser().parse_args(argv))


@dataclass(frozen=True)
class Col:
    """A table column: ``fmt`` turns a value into text (a suffix is part of it: ``"{:.2f}x"``), right-aligned
    to ``width`` characters unless ``left``."""

    header: str
    width: int
    fmt: str = "{}"
    left: bool = False

    def cell(self, text: str) -> str:
        return text.ljust(self.width) if self.left else text.rjust(self.width)


class Table:
    """A fixed-width console table: ``t = Table(Col("method", 38, left=True), Col("seconds", 9, "{:.2f}"))``,
    then ``print(t.header())`` and ``print(t.row(name, seconds))``; a row may leave its last columns out."""

    def __init__(self, *cols: Col) -> None:
        self.cols = cols

    def header(self) -> str:
        return "".join(c.cell(c.header) for c in self.cols)

    def row(self, *values: Any) -> str:
        if len(values) > len(self.cols):
            raise ValueError(f"{len(values)} values for {len(self.cols)} columns")
        return "".join(c.cell(c.fmt.format(v)) for c, v in zip(self.cols, values))


# ----------------------------------------------------------------------------- competing CPU load
_LOAD_CODE = {
    # a Python busy loop: one core's worth of work that needs no memory bandwidth
    "spin": "for _ in range(200_000): pass",
    # one-thread torch element-wise ops over 32 MiB: competes for the cores and for memory bandwidth
    "torch": "a.mul_(0.999).add_(1e-3)",
}
_LOAD_MAIN = """import os, sys, time
parent, end, kind = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), sys.argv[3]
if kind == "torch":
    import torch
    torch.set_num_threads(1)
    a = torch.ones(1 << 23)
while time.monotonic() < end and os.getppid() == parent:
    exec({work!r}[kind])
"""


class Load:
    """``n`` busy processes competing for the CPUs while the ``with`` block runs.

    Each one stops by itself after ``seconds`` or as soon as the process that started it is gone; leaving
    the block stops them all (also on an exception or Ctrl-C, and on SIGTERM, which is turned into
    ``SystemExit`` while the block runs, so that the measured processes started inside it are stopped too).
    ``Load(0)`` starts nothing."""

    def __init__(self, n: int, seconds: float = 900.0, kind: str = "spin") -> None:
        if n < 0 or kind not in _LOAD_CODE:
            raise ValueError(f"Load needs n >= 0 and kind in {sorted(_LOAD_CODE)}, got {n}, {kind!r}")
        self.n, self.seconds, self.kind = n, seconds, kind
        self.procs: list[subprocess.Popen] = []
        self._sigterm: Any = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> Load:
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        code = _LOAD_MAIN.format(work=_LOAD_CODE)
        try:
            for _ in range(self.n):
                args = [sys.executable, "-c", code, str(os.getpid()), str(self.seconds), self.kind]
                self.procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate (then kill, after 5 s) every load process and wait for it; restore SIGTERM."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
