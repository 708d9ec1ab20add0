"""OmegaConf resolvers used by the configs: `${minilm:}`, `${asset:squad_demo/train.jsonl}`, `${cpu_precision:}`,
`${launch_dir:}`."""

from __future__ import annotations

from omegaconf import OmegaConf

from rag_lightning.tokenization import minilm_dir


def cpu_precision() -> str:
    """Lightning precision for CPU training: bf16 autocast ("bf16-mixed") where the CPU multiplies bf16
    natively (AVX512-BF16 / AMX), else "32-true" (emulated bf16 is slower than fp32)."""
    from rag_lightning.retrieval.embed import cpu_has_bf16

    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def launch_dir() -> str:
    """The directory the command was started from: Hydra's `runtime.cwd` inside a job, else the process's cwd.

    `paths.root_dir` must resolve before Hydra sets its runtime config: a multirun resolves `hydra.sweep.dir`
    (which goes through `paths.log_dir`) before the first job, where `${hydra:runtime.cwd}` fails with
    "HydraConfig was not set"."""
    import os

    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = HydraConfig.get().runtime.get("cwd")
        if cwd:
            return str(cwd)
    return os.getcwd()


def register() -> None:
    from rag_lightning.data.registry import asset_path as asset

    for name, fn in {
        "minilm": minilm_dir,
        "asset": asset,
        "cpu_precision": cpu_precision,
        "launch_dir": launch_dir,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
