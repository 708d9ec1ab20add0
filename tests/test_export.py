"""rag-export (rag_lightning/commands/export.py): what plain transformers can run is written plainly (EOS / pad ids set); a generator it
cannot run (the demo's prefix-LM attention and copy head) is marked so that AutoModel refuses it, said on stdout
and in the README.md written inside, and loads with readers.from_pretrained with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_lora import _logits
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rag_lightning import readers

ROOT = Path(__file__).resolve().parents[1]


def _export_script():
    from rag_lightning.commands import export

    return export


def _export(tmp_path: Path, cfg_factory, *overrides: str):
    cfg = cfg_factory(
        *overrides, f"ckpt_path={tmp_path / 'x.ckpt'}", f"out={tmp_path / 'gen'}", config_name="export"
    )
    module = instantiate(cfg.model)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, cfg.ckpt_path)
    return _export_script().export(cfg, []), module.generator


def test_demo_generator_is_refused_by_plain_transformers_and_loads_with_the_package(
    tmp_path, cfg_factory, capsys
):
    out, trained = _export(tmp_path, cfg_factory)  # the default (demo) model: MiniLM prefix LM + copy head
    printed = capsys.readouterr().out
    assert "WARNING: plain transformers cannot run this generator" in printed
    assert (
        "prefix-LM attention" in printed and "copy head" in printed and "readers.from_pretrained(" in printed
    )
    readme = (out / "README.md").read_text()
    assert "Plain transformers cannot run this generator" in readme and "readers.from_pretrained" in readme
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="rag_lightning-generator .not runnable by plain transformers"):
            load(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))  # the tokenizer is plain
    config, gen_config = (
        json.loads((out / f).read_text()) for f in ("config.json", "generation_config.json")
    )
    for c in (config, gen_config):
        assert (
            c["eos_token_id"] == tok.sep_token_id == trained.eos_token_id
            and c["pad_token_id"] == tok.pad_token_id
        )
    plain = readers.from_pretrained(str(out))
    assert plain.prefix_lm and plain.pointer is not None and type(plain.model).__name__ == "BertLMHeadModel"
    assert plain.max_source_length == trained.max_source_length
    torch.testing.assert_close(_logits(plain), _logits(trained), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny:gpt2", "tiny:bart"])
def test_plain_generators_stay_plain_with_eos_and_pad(tmp_path, cfg_factory, capsys, name):
    out, trained = _export(
        tmp_path, cfg_factory, "retriever=tiny", "model=tiny", f"model.generator.name_or_path={name}"
    )
    assert "WARNING" not in capsys.readouterr().out
    assert "Plain transformers runs it" in (out / "README.md").read_text()
    assert AutoConfig.from_pretrained(str(out)).eos_token_id == trained.eos_token_id
    gen_config = json.loads((out / "generation_config.json").read_text())
    assert (
        gen_config["eos_token_id"] == trained.eos_token_id
        and gen_config["pad_token_id"] == trained.pad_token_id
    )
