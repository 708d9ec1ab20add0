"""The commands' one convention: configs derived from train.yaml (shared keys stated once and composed equal),
`ckpt_path=` a plain key, the run's config reused, outputs under logs/<command>/runs/<date_time> with a
results.json; the Python entry point on a classification task (its predictions are labels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF_DIR, compose_config, run_python
from hydra.utils import instantiate
from omegaconf import OmegaConf

COMMANDS = {"evaluate": ["ckpt_path=x.ckpt"], "export": ["ckpt_path=x.ckpt", "out=o"], "build_index": [],
            "eval_retrieval": ["ckpt_path=x.ckpt"]}  # fmt: skip
# what a command changes of train.yaml on purpose (each says so in its yaml)
OWN = {"hydra", "task_name", "tags", "callbacks", "logger", "ckpt_path"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_config_is_train_plus_its_own_keys(name):
    """conf/<command>.yaml starts from train and states no key train.yaml already states with that value."""
    train = yaml.safe_load((CONF_DIR / "train.yaml").read_text())
    own = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
    assert own["defaults"][0] == "train", f"conf/{name}.yaml: the first default is not train"
    restated = [k for k, v in own.items() if k != "defaults" and k in train and train[k] == v]
    assert not restated, f"conf/{name}.yaml restates train.yaml's {restated}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_config_composes_train_for_the_shared_keys(name, tmp_path):
    """Every key of the composed train config is in the command's, with the same value, except those the
    command sets itself (its name, tags, no callbacks / logger, a required checkpoint)."""
    train = OmegaConf.to_container(compose_config(root=tmp_path), resolve=False)
    cfg = compose_config(*COMMANDS[name], config_name=name, root=tmp_path)
    cmd = OmegaConf.to_container(cfg, resolve=False)
    assert set(train) - set(cmd) <= {"logger"}  # logger: null leaves no key
    differ = {k for k in train if train[k] != cmd.get(k)}
    assert differ <= OWN, f"{name}: {sorted(differ - OWN)} differ from train's"
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/logs/{name}/runs/")  # logs/<command>/runs/<date_time>
    if name != "build_index":
        assert cfg.ckpt_path == "x.ckpt"  # a plain key: `ckpt_path=`, never `+ckpt_path=`


@pytest.mark.slow
def test_eval_retrieval_reuses_the_run_and_writes_results(tiny_checkpoint, tmp_path):
    """`rag-eval-retrieval ckpt_path=...` alone: the run's config (tiny towers, its 24 passages and 4 eval
    questions per set), outputs under logs/eval_retrieval/runs/<date_time>, results.json as printed."""
    ckpt, _ = tiny_checkpoint
    proc = run_python(["-m", "rag_lightning.commands.eval_retrieval", f"ckpt_path={ckpt}"], cwd=tmp_path)
    (out,) = tmp_path.glob("logs/eval_retrieval/runs/*")
    result = json.loads((out / "results.json").read_text())
    assert f"results: {out / 'results.json'}" in proc.stdout
    assert result["ckpt_path"] == str(ckpt)
    records = result["results"]
    assert [(r["set"], r["n"]) for r in records] == [("demo_val", 4), ("demo_test", 4)]
    assert [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")] == records
    assert all(r["recall@1"] <= r["recall@5"] <= r["recall@20"] for r in records)
    assert "index: " in (out / "eval_retrieval.log").read_text()  # the log lands there too (built or loaded)


@pytest.mark.slow
def test_export_writes_results_under_logs_export(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    proc = run_python(["-m", "rag_lightning.commands.export", f"ckpt_path={ckpt}", "out=gen"], cwd=tmp_path)
    (out,) = tmp_path.glob("logs/export/runs/*")
    assert json.loads((out / "results.json").read_text()) == {
        "ckpt_path": str(ckpt),
        "out": str(tmp_path / "gen"),
    }
    assert (tmp_path / "gen" / "config.json").is_file() and f"results: {out / 'results.json'}" in proc.stdout


def test_pipeline_predicts_labels_for_a_classification_task(tmp_path, monkeypatch):
    """A classification checkpoint without a run dir (overrides given as on the command line): `answer` gives
    the task's labels, one per input, the same as predict's rows; retrieve gives k passages each."""
    from rag_lightning import RagPipeline

    over = ["data=demo_verify", "model=tiny", "retriever=tiny", f"paths.root_dir={tmp_path}"]
    cfg = compose_config(*over, "ckpt_path=x", config_name="evaluate", root=tmp_path)
    model = instantiate(cfg.model)
    ckpt = tmp_path / "verify.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    monkeypatch.chdir(tmp_path)
    pipe = RagPipeline.from_checkpoint(str(ckpt), over)
    claims = ["Warsaw is the capital of Poland.", "The Normans came from Norway.", "Beyonce sings."]
    labels = pipe.answer(claims)
    assert len(labels) == 3 and set(labels) <= {"SUPPORTS", "REFUTES"}
    assert [r["prediction"] for r in pipe.predict(claims)] == labels
    assert [len(p) for p in pipe.retrieve(claims, k=3)] == [3, 3, 3]


@pytest.mark.slow
def test_build_index_writes_results_under_logs_build_index(tmp_path):
    """`rag-build-index` (tiny towers, the demo corpus) from an empty folder: results.json names the prepared
    directory and its stamp, under logs/build_index/runs/<date_time>."""
    args = ["-m", "rag_lightning.commands.build_index", "model=tiny", "retriever=tiny", "chunk_size=400"]
    proc = run_python(args, cwd=tmp_path)
    (out,) = tmp_path.glob("logs/build_index/runs/*")
    result = json.loads((out / "results.json").read_text())
    assert f"results: {out / 'results.json'}" in proc.stdout
    assert (result["shard"], result["num_shards"]) == (0, 1)
    assert Path(result["prepared"]).parent == tmp_path / ".cache" / "rag_lightning" / "indexes"
    assert result["stamp"] == json.loads((Path(result["prepared"]) / "stamp.json").read_text())


def test_eval_retrieval_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    """The retriever's trainable weights must all come from the checkpoint (frozen towers are not saved)."""
    from rag_lightning.commands.eval_retrieval import load_retriever
    from rag_lightning.preflight import ConfigError

    cfg = compose_config("model=tiny", "retriever=tiny", f"ckpt_path={tmp_path / 'r.ckpt'}", root=tmp_path)
    retriever = instantiate(cfg.retriever)
    trainable = {n for n, p in retriever.named_parameters() if p.requires_grad}
    state = {f"retriever.{k}": v for k, v in retriever.state_dict().items() if k in trainable}
    torch.save({"state_dict": state}, cfg.ckpt_path)
    loaded = load_retriever(cfg)
    assert all(torch.equal(loaded.state_dict()[k[len("retriever.") :]], v) for k, v in state.items())
    del state[min(state)]
    torch.save({"state_dict": {**state, "retriever.bogus": torch.zeros(1)}}, cfg.ckpt_path)
    with pytest.raises(ConfigError, match=r"r\.ckpt does not fit the configured retriever \(2 keys"):
        load_retriever(cfg)
