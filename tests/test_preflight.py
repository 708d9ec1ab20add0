import pytest

from rag_lightning.preflight import ConfigError, require_files, require_model


def test_local_dir_and_tiny_pass(tmp_path):
    require_model(str(tmp_path))
    require_model("tiny:bart")


def test_missing_local_dir_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.generator.name_or_path='.*nope': no such directory"):
        require_model(str(tmp_path / "nope"), "model.generator.name_or_path")


def test_uncached_hub_id_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        require_model("facebook/bart-large", "model.generator.name_or_path")
    msg = str(e.value)
    assert "facebook/bart-large" in msg and "model.generator.name_or_path=/models/bart-large" in msg


def test_missing_files_listed_together(tmp_path):
    (tmp_path / "here.tsv").write_text("x")
    with pytest.raises(ConfigError) as e:
        require_files([("data.corpus.path", str(tmp_path / "psgs.tsv")), ("a", str(tmp_path / "here.tsv")),
                       ("data.train.path", str(tmp_path / "nq-train.csv"))])  # fmt: skip
    assert (
        "data.corpus.path" in str(e.value)
        and "nq-train.csv" in str(e.value)
        and "here.tsv" not in str(e.value)
    )


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_gpu_trainer_without_cuda_names_the_cpu_trainers(monkeypatch, tmp_path, trainer):
    import torch
    from conftest import compose_config

    from rag_lightning.preflight import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_config("retriever=tiny", "model=tiny", f"trainer={trainer}", root=tmp_path)
    with pytest.raises(ConfigError, match=r"no CUDA GPU: add `trainer=cpu`.*`trainer=ddp_sim`"):
        preflight(cfg)
    preflight(compose_config("retriever=tiny", "model=tiny", "trainer=ddp_sim", root=tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    preflight(cfg)  # a GPU machine: nothing to say


@pytest.mark.slow
def test_gpu_experiment_on_a_cpu_machine_is_one_line_exit_2(tmp_path):
    """`+experiment=nq` picks trainer=ddp: without CUDA the command stops at once, naming the CPU trainers
    (not Lightning's "No supported gpu backend found!"); its missing data / models are listed with it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(root / "train.py"), "+experiment=nq", "retriever=tiny", "model=tiny"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "No supported gpu backend" not in proc.stderr and "Traceback" not in proc.stderr
    assert "trainer.accelerator=gpu but this machine has no CUDA GPU: add `trainer=cpu`" in proc.stderr
