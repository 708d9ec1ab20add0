"""``rag-export``: a checkpoint's generator as a plain `save_pretrained` directory, LoRA adapters merged.

    rag-export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt out=/models/rag-generator

Config: conf/export.yaml. The model is built from the config (the run's `.hydra/config.yaml` next to the
checkpoint when there is one: ``rag_lightning.commands.run_config``), so frozen base weights come from
`model.generator.name_or_path`; the checkpoint's trainable weights (LoRA adapters, or the whole generator)
are loaded strictly on top. The adapters are then folded into the base weights and the plain transformers
model and its tokenizer (EOS and pad ids set in config.json and generation_config.json) and a README.md are
written to a temporary directory next to `out`, renamed to `out` when complete.
`rag_lightning.readers.from_pretrained(out)` loads it with the same outputs. A seq2seq or plain decoder-only generator is
also `AutoModelFor...from_pretrained(out)` with the same outputs. A generator plain transformers cannot run
(prefix-LM attention, copy head: the demo's) is marked: config.json's model_type makes AutoModel refuse it,
and the export says so on stdout and in the README.md it writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rag_lightning.commands.common import fail, hydra_app, write_results
from rag_lightning.commands.run_config import apply_run_config, load_weights
from rag_lightning.preflight import require_model
from rag_lightning.readers.causal import POINTER_FILE, REFUSED_MODEL_TYPE

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
    gen = model.generator
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        gen.save_pretrained(tmp)  # merges LoRA adapters into the base weights; sets EOS / pad ids
        limits = gen.unsupported_by_transformers()
        (tmp / "README.md").write_text(readme(gen, cfg.ckpt_path, limits), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported the generator of %s to %s", cfg.ckpt_path, out)
    print(f"exported generator: {out}")
    if limits:
        print(
            f"WARNING: plain transformers cannot run this generator ({'; '.join(limits)}). config.json's "
            f"model_type is marked so that AutoModel*.from_pretrained refuses it; load it with "
            f"`from rag_lightning import readers; readers.from_pretrained({str(out)!r})` "
            f"(see {out / 'README.md'})"
        )
    return out


def readme(gen: object, ckpt_path: str, limits: list[str]) -> str:
    """What the exported directory holds, what plain transformers can run of it, and how to load the rest."""
    model = type(gen.model).__name__
    auto = "AutoModelForCausalLM" if gen.kind == "causal" else "AutoModelForSeq2SeqLM"
    load = (
        "```python\nfrom rag_lightning import readers\n\n"
        'gen = readers.from_pretrained("path/to/this/dir")  # the generator as trained, '
        f"gen.model: the {model}\n```\n"
    )
    head = (
        f"# rag-lightning generator\n\nExported by `rag-export` from `{ckpt_path}` (LoRA adapters "
        f"merged). EOS id {gen.eos_token_id}, pad id {gen.pad_token_id} (config.json, generation_config.json).\n\n"
    )
    if not limits:
        return (
            f"{head}Plain transformers runs it: `{auto}.from_pretrained(dir)` ({model}) gives the same outputs "
            f"as the trained generator for the same input ids. The input is the question and passage "
            f"assembled as rag-lightning does (`rag_generator.json` holds a causal generator's prompt template); "
            f"with this package:\n\n{load}"
        )
    items = "".join(f"- {x}\n" for x in limits)
    return (
        f"{head}**Plain transformers cannot run this generator.** What the {model} weights alone do not carry:"
        f"\n\n{items}\nSo `config.json`'s `model_type` is `{REFUSED_MODEL_TYPE}` and `{auto}.from_pretrained` "
        f"refuses the directory instead of loading weights that decode garbage (the real type is in "
        f"`rag_generator.json`, `transformers_model_type`). Load it with this package:\n\n{load}\n"
        f"`readers.from_pretrained` restores the model type, the attention and the copy head "
        f"(`{POINTER_FILE}`); this package's decoding (`rag_lightning.models.decode`, `rag-evaluate`) uses them.\n"
    )


def run(cfg: DictConfig) -> None:
    from rag_lightning.preflight import ConfigError

    hc = HydraConfig.get()
    try:
        out = export(cfg, list(hc.overrides.task))
    except (ConfigError, FileExistsError) as e:  # a refused run config, a missing model, `out` exists
        fail(e)
    write_results(hc.runtime.output_dir, {"ckpt_path": str(cfg.ckpt_path), "out": str(out.resolve())})


def main() -> None:
    hydra_app("export", run)


if __name__ == "__main__":
    main()
