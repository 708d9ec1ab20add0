#!/usr/bin/env python
"""Export a checkpoint's generator as a plain `save_pretrained` directory, LoRA adapters merged.

    python scripts/export.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt out=/models/rag-generator

Config: conf/export.yaml. The model is built from the config (the run's `.hydra/config.yaml` next to the
checkpoint when there is one, as in scripts/evaluate.py), so frozen base weights come from
`model.generator.name_or_path`; the checkpoint's trainable weights (LoRA adapters, or the whole generator)
are loaded strictly on top. The adapters are then folded into the base weights and the plain transformers
model and its tokenizer are written to a temporary directory next to `out`, renamed to `out` when complete.
`Generator.from_pretrained(out)` (or `AutoModelFor...from_pretrained(out)`) loads it with the same outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import apply_run_config, load_weights  # noqa: E402

from rag_lightning import resolvers  # noqa: E402, F401  (registers ${minilm:} and ${asset:...})
from rag_lightning.preflight import require_model  # noqa: E402

log = logging.getLogger("export")


def export(cfg: DictConfig, overrides: list[str]) -> Path:
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"out={str(out)!r} exists; choose a new directory")
    cfg = apply_run_config(cfg, overrides)  # refuses a _target_ that is not a known constructor
    for key in ("model.generator.name_or_path", "retriever.query_encoder.name_or_path"):
        require_model(str(OmegaConf.select(cfg, key)), key)
    model = hydra.utils.instantiate(cfg.model)
    load_weights(model, cfg.ckpt_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.generator.save_pretrained(tmp)  # merges LoRA adapters into the base weights
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported the generator of %s to %s", cfg.ckpt_path, out)
    print(f"exported generator: {out}")
    return out


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rag_lightning.preflight import ConfigError

    try:
        export(cfg, list(HydraConfig.get().overrides.task))
    except (ConfigError, FileExistsError) as e:  # a refused run config, a missing model, `out` exists
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
