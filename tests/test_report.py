"""The run's report image: curves parsed from the CSV log, the picture written, and a run writes one."""

from pathlib import Path

import pytest

from rag_lightning.report import read_curves, write_report

CSV = """epoch,step,train/loss,val/loss,val/em,val/recall@1,val/demo_val/em,val/p_entropy
0,0,,30.0,0.0,0.6,0.0,0.7
0,9,12.5,,,,,
0,19,nan,,,,,
0,19,9.0,,,,,
0,19,,20.0,0.25,0.7,0.25,0.6
"""


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_curves_skip_blank_and_nonfinite_cells(tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text(CSV, encoding="utf-8")
    curves = read_curves(f)
    assert curves["train/loss"] == [(9, 12.5), (19, 9.0)]  # the nan row is dropped
    assert curves["val/em"] == [(0, 0.0), (19, 0.25)]
    assert "epoch" not in curves and "step" not in curves


def test_report_is_a_png_written_atomically(tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text(CSV, encoding="utf-8")
    before = {"val/loss": 30.0, "val/em": 0.0, "val/recall@1": 0.6, "val/demo_val/em": 0.0}
    after = {"val/loss": 20.0, "val/em": 0.25, "val/recall@1": 0.7}
    out = write_report(tmp_path / "r" / "report.png", read_curves(f), before, after, {"test/em": 0.2}, "t")
    assert _png_size(out) == (1300, 900)
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.png"]  # no temporary left


@pytest.mark.slow
def test_a_training_run_writes_its_report(tmp_path):
    from test_train import run_cfg

    from rag_lightning.train import train

    cfg = run_cfg(tmp_path, ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                             "validate_before_fit=true", "test=false"])  # fmt: skip
    train(cfg)
    assert _png_size(Path(cfg.paths.output_dir) / "report.png")[0] > 0
