"""Exit codes of the ranks Lightning's subprocess launcher starts (trainer=ddp_sim, trainer=ddp on one node).

Rank 0 runs the command; Lightning starts ranks 1..N-1 as child processes and a thread that watches them.
When a child fails, that thread kills every process with SIGKILL, rank 0 included, so the command ends with
exit code 137 whatever the child said: a bad data file that rank 1 reports with exit code 2 (one line naming
file, line and field) looked like an out-of-memory kill. `propagate_rank_exit_codes` makes rank 0 end with the
failed child's code instead (2 for bad input), after saying which rank stopped the run.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _exit_code(returncode: int) -> int:
    """A child's `Popen.returncode` as a shell reports it: killed by signal N (-N) is 128 + N."""
    return returncode if returncode > 0 else 128 - returncode


def propagate_rank_exit_codes() -> None:
    """Patch Lightning's child-process observer (idempotent; nothing when this Lightning has none)."""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # pragma: no cover - another Lightning layout: keep its behaviour
        return
    if getattr(_ChildProcessObserver, "_rag_exit_codes", False):
        return
    kill_all = _ChildProcessObserver._terminate_all

    def terminate_all(self: Any) -> None:
        failed = [(i + 1, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode]
        if not failed or self._main_pid != os.getpid():
            return kill_all(self)
        for p in self._child_processes:
            if p.returncode is None:
                p.send_signal(self._termination_signal)
        rank, code = failed[0]
        print(f"error: rank {rank} exited with code {code}; every rank stops", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(_exit_code(code))  # rank 0 may be blocked in a collective: end now, with the rank's code

    _ChildProcessObserver._terminate_all = terminate_all
    _ChildProcessObserver._rag_exit_codes = True
