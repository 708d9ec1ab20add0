"""Registers rag_lightning's Optuna sweeper with Hydra, which instantiates plugins only from `hydra_plugins.*`.

`hydra_plugins` is a namespace package (no `__init__.py`) shared with every other installed Hydra plugin.
The implementation and its documentation: rag_lightning/sweeper.py.
"""

from rag_lightning import sweeper as _sweeper


class OptunaSweeper(_sweeper.OptunaSweeper):
    """`hydra/sweeper: rag_optuna` (conf/hydra/sweeper/rag_optuna.yaml)."""
