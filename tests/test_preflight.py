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
