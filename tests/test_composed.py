"""The composed config of every model x index choice, every retriever, every data config and every experiment,
compared byte for byte (keys sorted: a key stated in a base keeps the base's place) with a snapshot
(tests/data/composed/). The config groups state shared keys once in a
base (conf/model/base.yaml, conf/index/base.yaml, conf/retriever/base.yaml, conf/data/base.yaml); moving a key
into a base must not change what any choice composes to.

Deliberate differences since the snapshot was taken from main's conf/ (each applied to the snapshot in the commit
that made it):
- `model=llm` (and experiment=nq_llm) gained `fused_loss: true`, `generator_loss: null`, `retriever_loss: null` and
  `objective_args` from conf/model/base.yaml: RagModule's own defaults, which llm.yaml left implicit (the module
  computes the same);
- the demo data configs (data=demo, demo_verify, demo_longform, and every case composed on data=demo): `format: auto`
  in place of `format: jsonl` (the same files, read the same way; a path swapped for a tsv is then read as one) and
  `fields` declared with null values, so `data.corpus.fields.text=body` needs no `+` (docs/data.md);
- `index.keep: true` (conf/index/base.yaml): an index built with a frozen document encoder is kept under
  `index.root` (docs/index-and-scale.md);
- experiment=demo_longform: 300 steps (validation at the end), `optimizer.lr: 5e-4`, `model.decoding.max_length: 64`
  (ROUGE-L rose 4.3 points at 150 steps and lr 3e-4; docs/tasks.md, "Measured").

After a deliberate change: `python tests/test_composed.py` rewrites the snapshot; review its diff."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf

SNAPSHOT_DIR = Path(__file__).parent / "data" / "composed"
ROOT = "/ROOT"  # paths.root_dir: the snapshot must not depend on where the checkout lives


def _options(group: str, *, skip: tuple[str, ...] = ("base",)) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem not in skip)


# every choice, named as its snapshot file; the options are the snapshot's, so a new config file adds a case that
# fails until its snapshot is written
CASES: dict[str, list[str]] = {
    **{
        f"model={m},index={i}": [f"model={m}", f"index={i}"]
        for m in _options("model")
        for i in _options("index")
    },
    **{f"retriever={r}": [f"retriever={r}"] for r in _options("retriever")},
    **{f"data={d}": [f"data={d}"] for d in _options("data")},
    **{f"experiment={e}": [f"+experiment={e}"] for e in _options("experiment")},
}


def composed_yaml(overrides: list[str], conf_dir: Path = CONF_DIR) -> str:
    """conf/train.yaml with OVERRIDES as `python train.py OVERRIDES` composes it, unresolved, without the
    `hydra` node (which holds the run's time and the overrides themselves), keys sorted."""
    cfg = compose_config(*overrides, root=ROOT, conf_dir=conf_dir)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return OmegaConf.to_yaml(cfg, sort_keys=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_composed_config_matches_the_snapshot(case):
    snapshot = SNAPSHOT_DIR / f"{case}.yaml"
    assert snapshot.is_file(), (
        f"no snapshot for {case}: run `python tests/test_composed.py` and review the diff"
    )
    assert composed_yaml(CASES[case]) == snapshot.read_text()


def test_no_snapshot_without_a_config():
    """A snapshot whose config file was removed or renamed is stale."""
    assert sorted(p.stem for p in SNAPSHOT_DIR.glob("*.yaml")) == sorted(CASES)


if __name__ == "__main__":  # python tests/test_composed.py [CONF_DIR, e.g. another commit's conf/]
    import sys

    conf = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else CONF_DIR
    SNAPSHOT_DIR.mkdir(parents=True, exist_ok=True)
    for stale in SNAPSHOT_DIR.glob("*.yaml"):
        stale.unlink()
    for name, overrides in CASES.items():
        (SNAPSHOT_DIR / f"{name}.yaml").write_text(composed_yaml(overrides, conf))
    print(f"{len(CASES)} snapshots in {SNAPSHOT_DIR}")
