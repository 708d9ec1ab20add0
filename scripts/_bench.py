"""What the benchmark scripts share (a library, not a script): one command line per benchmark, the same
alone (``python scripts/bench_decode.py ...``) and as a sub-command of ``scripts/benchmark.py``, and the
fixed-width tables they print."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bench:
    """A benchmark: ``name`` is its sub-command of scripts/benchmark.py, ``doc`` its long description (the
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
