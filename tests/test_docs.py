"""The documentation is tested against the code: the site builds strictly, every shell command the README and
docs/ show runs (tiny models and 1-2 steps where the real run is long), every config snippet composes and sets
only keys that exist.

RUN maps each documented command to the extra overrides it runs with; SKIP names the commands not run and why.
A command in a fenced ``bash`` block that is in neither fails the suite, and so does an entry that no page
shows any more. Commands run in-process (``runpy``, as ``python script.py`` would), block by block: the
commands of one block share a temporary log / cache folder, and ``logs/train/runs/<date>`` in a command is
the newest run of the block (or of a tiny run made once for the module) that has a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF_DIR, ROOT, compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_DIR = "logs/train/runs/<date>"  # how the pages name a run's output folder

MODELS = ["model=tiny", "retriever=tiny"]
SMALL = [
    "data.max_train_examples=8",
    "data.max_eval_examples=4",
    "data.batch_size=2",
    "data.eval_batch_size=4",
]
QUIET = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2"]
TINY = [*MODELS, *SMALL, *QUIET, *STEPS, "validate_before_fit=false", "test=false"]

TINY_RUN = "python train.py model=tiny retriever=tiny trainer.max_steps=20 trainer.val_check_interval=10"
PREPARE = [
    "rag-build-index shard=0 num_shards=2 chunk_size=400",
    "rag-build-index shard=1 num_shards=2 chunk_size=400",
]
EVALUATE = f"rag-evaluate ckpt_path={RUN_DIR}/checkpoints/last.ckpt"

# documented command -> extra overrides it runs with ({tmp}: the block's temporary folder)
RUN: dict[str, list[str]] = {
    TINY_RUN: [*MODELS, *SMALL, *QUIET, *STEPS],  # with validation before training and the test: the summary
    "python train.py trainer.max_steps=200 trainer.val_check_interval=100 data.max_eval_examples=20": TINY,
    **{cmd: MODELS for cmd in PREPARE},
    "python train.py trainer.max_steps=20 trainer.val_check_interval=20 model.retriever_start_step=0": TINY,
    EVALUATE: [],
    f"{EVALUATE} split=val model.decoding.num_beams=4": [],
    "python train.py debug=fdr": [*MODELS, *SMALL, *QUIET],
    "python train.py model=tiny retriever=tiny debug=overfit trainer.val_check_interval=100": [
        *SMALL,
        *QUIET,
        *STEPS,
    ],
    "python train.py model=tiny retriever=tiny trainer.max_steps=30 trainer.val_check_interval=10 "
    f"ckpt_path={RUN_DIR}/checkpoints/last.ckpt": [
        *SMALL,
        *QUIET,
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
    ],
    "python train.py +experiment=nq --cfg job": [],
    "python train.py model=tiny retriever=tiny model.generator.kind=causal model.generator.name_or_path=tiny:gpt2 "
    "debug=overfit optimizer.lr=3e-3 scheduler.num_warmup_steps=0 trainer.max_steps=60 "
    "trainer.val_check_interval=60": [*SMALL, *QUIET, *STEPS],
    f"{TINY_RUN} 'model.retriever_loss={{marginal:1.0,contrastive:1.0}}'": TINY,
    f"{TINY_RUN} retriever.similarity=cosine retriever.temperature=0.05": TINY,
    f"{TINY_RUN} retriever.train_doc_encoder=true callbacks.refresh_index.every_n_steps=10": [
        *TINY,
        "callbacks.refresh_index.every_n_steps=2",
    ],
    "python train.py -m model=tiny retriever=tiny trainer.max_steps=4 trainer.val_check_interval=4 "
    "model.variant=token,sequence": TINY,
    "python train.py -m hparams_search=optuna hydra.sweeper.n_trials=2 model=tiny retriever=tiny "
    "trainer.max_steps=4 trainer.val_check_interval=4": [*TINY, "hydra.sweeper.n_trials=1"],
    "rag-eval-retrieval retriever.similarity=cosine retriever.temperature=0.05": [
        *MODELS,
        *SMALL,
    ],
    f"rag-eval-retrieval ckpt_path={RUN_DIR}/checkpoints/last.ckpt": SMALL,
    f"rag-export ckpt_path={RUN_DIR}/checkpoints/last.ckpt out=models/rag-generator": [
        "out={tmp}/rag-generator"
    ],
    "python train.py model=tiny retriever=tiny index.verify=size": TINY,
    "python train.py model=tiny retriever=tiny trainer.max_steps=4 trainer.val_check_interval=4 index.keep=false": TINY,
    "python train.py model=tiny retriever=tiny callbacks.nonfinite_guard.max_consecutive=10": TINY,
    "python train.py model=tiny retriever=tiny callbacks.nonfinite_guard=null": TINY,
    "python train.py model=tiny retriever=tiny model.variant=fid model.generator.name_or_path=tiny:t5": TINY,
    "python train.py model=tiny retriever=tiny model.variant=concat model.generator.name_or_path=tiny:llama": TINY,
    "python train.py model=tiny retriever=tiny model.variant=fid model.generator.name_or_path=tiny:t5 "
    "model.retriever_loss='{adist: 1.0, pdist: 0.5}'": TINY,
    "rag-build-index retriever.mode=bm25": MODELS,
    "rag-build-index retriever.mode=hybrid": MODELS,
    "python train.py retriever.mode=hybrid retriever.hybrid.fusion=weighted retriever.hybrid.dense_weight=0.7": TINY,
    "python train.py model.retriever_loss=contrastive +model.objective_args.contrastive.bm25_negatives=1": TINY,
    "rag-eval-retrieval": [*MODELS, *SMALL],
    "rag-eval-retrieval retriever.mode=bm25": [*MODELS, *SMALL],
    "rag-eval-retrieval retriever.mode=hybrid": [*MODELS, *SMALL],
}

# what the log of a documented command must show
EXPECT = {
    "python train.py trainer.max_steps=20 trainer.val_check_interval=20 model.retriever_start_step=0": "index: loaded"
}

NQ_MODELS = (
    "model.generator.name_or_path=/models/bart-large "
    "retriever.query_encoder.name_or_path=/models/dpr-question_encoder-single-nq-base "
    "retriever.doc_encoder.name_or_path=/models/dpr-ctx_encoder-single-nq-base"
)
NEEDS_DPR = "needs DPR's NQ files and models; the same flow runs on synthetic data in tests/test_scale.py"
KILT_FILES = "needs KILT's files; tests/test_kilt_experiments.py composes the kilt_* experiments offline"
KILT_EVAL = (
    "needs KILT's dev files; tests/test_eval_kilt.py and tests/test_kilt_validation.py run rag-eval-kilt"
)
SQUAD = "embeds SQuAD v1.1 dev's 2,067 paragraphs (minutes); tests/test_real_data.py uses the file"
OWN_DATA = " ".join(
    ["python train.py data.corpus.path=my/passages.tsv data.corpus.fields.text=body"]
    + [f"data.{s}_sets.0.path=my/{f}.jsonl data.{s}_sets.0.fields.question=q data.{s}_sets.0.fields.answers=golds"
       for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))]
)  # fmt: skip
SKIP: dict[str, str] = {
    OWN_DATA: "needs the user's files; tests/test_own_data.py runs these overrides on files it writes",
    "pip install torch==2.13.0 && pip install -e . && python train.py": "installs, then the full demo "
    "(minutes); its parts run here with tiny models",
    'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest': "installs, then this suite "
    "(what .ci/run runs)",
    "python -m pytest tests/test_objectives.py -x -q": "a part of this suite",
    'python -m pytest -m "not slow" -q': "a part of this suite",
    "ruff check . && ruff format --check .": "the lint step of CI",
    "mkdocs build --strict --site-dir /tmp/rag-lightning-site": "test_site_builds_strictly runs it",
    "mkdocs serve": "a web server",
    "jupyter execute notebooks/01_quickstart.ipynb": "tests/test_notebooks.py executes the notebooks (nbclient, "
    "what jupyter execute runs)",
    f"python train.py +experiment=nq paths.data_dir=/data/dpr {NQ_MODELS} trainer.devices=8": NEEDS_DPR,
    f"python train.py +experiment=nq paths.data_dir=/data/dpr trainer.devices=8 {NQ_MODELS}": NEEDS_DPR,
    "torchrun --nproc-per-node 8 --no-python rag-build-index +experiment=nq paths.data_dir=/data/dpr "
    "retriever.doc_encoder.name_or_path=/models/dpr-ctx_encoder-single-nq-base": NEEDS_DPR + " (8 GPUs)",
    "python train.py +experiment=nq_llm paths.data_dir=/data/dpr "
    "model.generator.name_or_path=/models/Qwen2.5-1.5B-Instruct "
    "retriever.query_encoder.name_or_path=/models/dpr-question_encoder-single-nq-base "
    "retriever.doc_encoder.name_or_path=/models/dpr-ctx_encoder-single-nq-base": NEEDS_DPR + " (and Qwen2.5)",
    "python train.py +experiment=squad_open paths.data_dir=../shared/data": "needs SQuAD v1.1's dev-v1.1.json "
    "(tests/test_real_data.py uses it when present)",
    "python train.py -m model.variant=token,sequence optimizer.lr=1e-5,3e-5": "4 demo runs; the tiny two-job "
    "sweep runs",
    "python train.py -m hparams_search=optuna": "20 demo runs; the tiny two-trial study runs",
    "python train.py -m hparams_search=optuna hydra.sweeper.n_trials=50 trainer.max_steps=2000": "50 long runs",
    "python train.py -m hparams_search=optuna hydra.sweeper.storage=sqlite:///$HOME/optuna.db": "20 demo runs; "
    "tests/test_sweeps.py resumes a persisted study",
    "python train.py -m hydra/launcher=slurm trainer=ddp hydra.launcher.gpus_per_node=4 "
    "hydra.launcher.partition=gpu hydra.launcher.timeout_min=720 optimizer.lr=1e-5,3e-5": "submits to SLURM; "
    "tests/test_sweeps.py renders the sbatch script",
    **{
        f"python benchmarks/benchmark.py {args}": "a benchmark (minutes); tests/test_packaging.py runs every "
        "script's --help"
        for args in (
            "index --n 4000",
            "index --squad ../shared/data/dev-v1.1.json --max-len 256",
            "decode --repeats 2",
            "corpus",
            "train-step --json train_step.json --device cpu",
            "train-step --loss-only",
            "profile-step --setting demo --steps 3",
            "scale --n 5000",
        )
    },  # fmt: skip
    "python train.py -m model=tiny retriever=tiny debug=fdr model.variant=token,sequence": "tests/test_sweeps.py "
    "runs it from a temporary directory",
    "python train.py -m hparams_search=optuna model=tiny retriever=tiny data.max_train_examples=8 "
    "data.max_eval_examples=4 trainer.max_steps=2 trainer.val_check_interval=2 validate_before_fit=false "
    "test=false hydra.sweeper.n_trials=2 hydra.sweeper.storage=sqlite:///$PWD/optuna.db": "tests/test_sweeps.py "
    "runs it from a temporary directory (it writes optuna.db where it runs)",
    "python train.py hydra/launcher=slurm trainer=ddp hydra.launcher.gpus_per_node=4 --cfg all --resolve "
    "--package hydra.launcher": "tests/test_sweeps.py composes the SLURM launcher",
    "WANDB_MODE=offline python train.py model=tiny retriever=tiny trainer.max_steps=4 trainer.val_check_interval=4 "
    "logger=wandb": "starts the W&B service; tests/test_wandb.py runs W&B offline",
    **{
        c: KILT_FILES
        for c in (
            "python train.py +experiment=kilt_nq paths.data_dir=/data",
            "python train.py +experiment=kilt_nq paths.data_dir=/data data.corpus=kilt_w100",
            "python train.py +experiment=kilt_nq paths.data_dir=/data trainer.devices=8",
        )
    },
    "python scripts/kilt_passages.py /data/kilt/kilt_knowledgesource.json /data/kilt/kilt_w100_title.tsv": "needs "
    "KILT's knowledge source (5.9M pages); tests/test_kilt_data.py runs the chunker on small files",
    "rag-eval-kilt predictions.jsonl /data/kilt/nq-dev-kilt.jsonl": KILT_EVAL,
    "rag-eval-kilt logs/evaluate/runs/<date_time>/kilt_predictions.jsonl /data/kilt/nq-dev-kilt.jsonl": KILT_EVAL,
    "rag-evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt split=val": "a KILT run's "
    "checkpoint; tests/test_kilt_validation.py runs train -> evaluate -> rag-eval-kilt on small KILT files",
    "python train.py model.variant=concat": "the full demo with the one-prompt reader (minutes); the tiny concat "
    "run runs",
    "python -m pytest tests/test_fusion_readers.py -q": "a part of this suite",
    "python benchmarks/benchmark.py train-step --fid": "a benchmark (minutes)",
    "python benchmarks/benchmark.py bm25 --n 100000": "a benchmark (minutes)",
    "python benchmarks/benchmark.py bm25 --n 1000000": "a benchmark (minutes)",
    "python train.py model=tiny retriever=tiny model.variant=VARIANT model.generator.name_or_path=NAME debug=overfit "
    "optimizer.lr=3e-3 scheduler.num_warmup_steps=0 trainer.max_steps=60 trainer.val_check_interval=60": "a "
    "template (VARIANT, NAME); the tiny fid and concat runs run",
    "python train.py retriever=e5 retriever.query_encoder.name_or_path=/models/e5-base-v2": "needs the E5 weights; "
    "tests/test_retrievers.py checks the e5 / bge / contriever conventions on tiny towers",
    "rag-eval-retrieval +experiment=squad_open paths.data_dir=../shared/data retriever.mode=dense": SQUAD,
    "rag-eval-retrieval +experiment=squad_open paths.data_dir=../shared/data "
    '"modes=[dense,bm25,hybrid,hybrid-weighted]"': SQUAD,
    "rag-eval-retrieval +experiment=squad_open paths.data_dir=../shared/data retriever.mode=bm25": SQUAD,
    "rag-eval-retrieval +experiment=squad_open paths.data_dir=../shared/data retriever.mode=hybrid": SQUAD,
    "python train.py +experiment=squad_open paths.data_dir=../shared/data model=tiny model.variant=fid "
    "model.generator.name_or_path=tiny:t5 model.generator.max_source_length=128 model.retriever_lr=1e-5 "
    '"model.eval_ks=[1,5,20]" model.decoding.max_length=16 optimizer.lr=3e-3 trainer.max_steps=200 '
    "trainer.val_check_interval=200 test=false logger=csv model.retriever_loss=adist": SQUAD
    + "; the tiny fid run runs",
}

CONFIG_OF = {  # Hydra apps and the config each composes
    "train.py": "train",
    "rag-build-index": "build_index",
    "rag-evaluate": "evaluate",
    "rag-export": "export",
    "rag-eval-retrieval": "eval_retrieval",
}
MODULE_OF = {  # the console commands (pyproject.toml) and the module each runs
    "rag-build-index": "rag_lightning.commands.build_index",
    "rag-evaluate": "rag_lightning.commands.evaluate",
    "rag-export": "rag_lightning.commands.export",
    "rag-eval-retrieval": "rag_lightning.commands.eval_retrieval",
}


def app_and_args(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(Hydra app, its arguments) of `python train.py ARGS` or `rag-<command> ARGS`; None for another command."""
    if len(tokens) >= 2 and tokens[0] == "python" and tokens[1] in CONFIG_OF:
        return tokens[1], tokens[2:]
    if tokens and tokens[0] in MODULE_OF:
        return tokens[0], tokens[1:]
    return None


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    text: str


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group(1)), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        blocks.append(Block(path.relative_to(ROOT).as_posix(), start + 1, m.group(2), "\n".join(body)))
        i += 1
    return blocks


def logical_lines(text: str) -> list[str]:
    """Continuation lines (ending in a backslash) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def command_key(line: str) -> str:
    """A command as RUN and SKIP name it: comments dropped, whitespace collapsed, quotes kept as written."""
    tokens = shlex.split(line, comments=True, posix=False)
    return " ".join(tokens)


def bash_commands(block: Block) -> list[str]:
    return [k for k in map(command_key, logical_lines(block.text)) if k]


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
BASH = [b for b in ALL_BLOCKS if b.lang == "bash"]


def documented_commands() -> list[str]:
    return [c for b in BASH for c in bash_commands(b)]


def test_every_documented_command_is_run_or_skipped():
    documented = documented_commands()
    unknown = [c for c in documented if c not in RUN and c not in SKIP]
    assert not unknown, (
        "commands the docs show that tests/test_docs.py neither runs nor skips:\n" + "\n".join(unknown)
    )
    stale = [c for c in [*RUN, *SKIP] if c not in documented]
    assert not stale, "RUN / SKIP entries no page shows:\n" + "\n".join(stale)
    assert not set(RUN) & set(SKIP)


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists() and (
        tmp_path / "site" / "measured" / "index.html"
    ).exists()


def _anchors(path: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {slugify(h.replace("`", ""), "-") for h in heads}


def test_readme_links_into_docs_resolve():
    links = re.findall(
        r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", (ROOT / "README.md").read_text(encoding="utf-8")
    )
    assert len(links) >= 10
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        assert not anchor or anchor in _anchors(ROOT / target), f"README: no #{anchor} in {target}"


# ---- config snippets --------------------------------------------------------------------------------------


def hydra_override_lists() -> list[tuple[str, str, list[str]]]:
    """(where, script, overrides) of every `python <Hydra app> ...` the pages show: bash and text blocks
    (a leading `$ ` dropped) and inline code."""
    found = []
    for b in ALL_BLOCKS:
        if b.lang in ("bash", "text", ""):
            for line in logical_lines(b.text):
                line = line.removeprefix("$ ").strip()
                if re.match(r"^([A-Z_]+=\S* )*(python|rag-[a-z-]+) ", line):
                    found.append((f"{b.page}:{b.line}", line))
    for page in PAGES:
        for span in re.findall(r"`((?:python|rag-[a-z-]+) [^`]+)`", page.read_text(encoding="utf-8")):
            found.append((page.relative_to(ROOT).as_posix(), span))
    out = []
    for where, line in found:
        tokens = shlex.split(line, comments=True)
        while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value prefixes
            tokens = tokens[1:]
        if (app := app_and_args(tokens)) is not None:
            out.append((where, *app))
    return out


def composable(args: list[str]) -> list[str]:
    """The overrides of a command line: flags dropped, placeholders (OBJ, NAME) dropped, the first value of
    each sweep (`-m a=x,y` composes as `a=x`), environment variables expanded."""
    multirun = "-m" in args or "--multirun" in args
    out, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("--cfg", "-c", "--package", "-p"):
            skip_next = True
            continue
        if a.startswith("-") or re.fullmatch(r"[A-Z]+|\.\.\.", a):
            continue
        a = re.sub(r"<(\w+)>", r"\1", os.path.expandvars(a))  # <date>: a folder name the user fills in
        if multirun:
            (override,) = OverridesParser.create().parse_overrides([a])
            if override.is_sweep_override():
                a = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        out.append(a)
    return out


OVERRIDES = hydra_override_lists()


def test_pages_show_override_lists():
    assert len(OVERRIDES) >= 30 and {s for _, s, _ in OVERRIDES} == set(CONFIG_OF)


@pytest.mark.parametrize(("where", "script", "args"), OVERRIDES, ids=[f"{w}:{s}" for w, s, _ in OVERRIDES])
def test_documented_overrides_compose(where, script, args, tmp_path):
    cfg = compose_config(*composable(args), config_name=CONFIG_OF[script], root=tmp_path)
    assert isinstance(cfg, DictConfig) and "model" in cfg, where


TRAIN_RUNS = [(w, a) for w, s, a in OVERRIDES if s == "train.py" and "-m" not in a and "--cfg" not in a]


@pytest.mark.parametrize(("where", "args"), TRAIN_RUNS, ids=[w for w, _ in TRAIN_RUNS])
def test_documented_run_length_fits_the_schedule(where, args, tmp_path):
    """The documented step count with the configured schedule, as configure_optimizers builds it (the tiny
    overrides the commands run with would hide a retriever that never starts learning)."""
    from hydra.utils import instantiate

    cfg = compose_config(*composable(args), root=tmp_path)
    steps = cfg.trainer.get("max_steps") or -1
    if not cfg.train or steps <= 0 or cfg.trainer.get("fast_dev_run"):
        return
    start = cfg.model.get("retriever_start_step") or 0
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "name": "generator"}]
    groups.append({"params": [torch.nn.Parameter(torch.zeros(1))], "name": "retriever", "start_step": start})
    instantiate(cfg.scheduler)(torch.optim.SGD(groups, lr=0.1), num_training_steps=steps)


YAML = [b for b in ALL_BLOCKS if b.lang == "yaml"]


def _missing_keys(snippet: dict, base: DictConfig, prefix: str = "") -> list[str]:
    missing = []
    for key, value in snippet.items():
        path = f"{prefix}{key}"
        if key not in base:
            missing.append(path)
        elif isinstance(value, dict) and isinstance(base[key], DictConfig):
            missing += _missing_keys(value, base[key], path + ".")
    return missing


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory) -> Path:
    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=shutil.ignore_patterns("local"))
    return conf


def test_pages_show_yaml_snippets():
    assert len(YAML) >= 4


@pytest.mark.parametrize("block", YAML, ids=[f"{b.page}:{b.line}" for b in YAML])
def test_yaml_snippet_composes_and_sets_existing_keys(block, conf_copy, tmp_path):
    """Each yaml block is an experiment file (`# @package _global_`): it composes as `+experiment=...`, and every
    key it sets already exists in the config it is merged into (its own defaults without its body)."""
    assert block.text.startswith("# @package _global_"), (
        f"{block.page}:{block.line}: start with # @package _global_"
    )
    snippet = yaml.safe_load(block.text) or {}
    defaults = snippet.pop("defaults", [])
    exp = conf_copy / "experiment"
    (exp / "_doc.yaml").write_text(block.text, encoding="utf-8")
    base_text = "# @package _global_\n" + (yaml.safe_dump({"defaults": defaults}) if defaults else "")
    (exp / "_doc_base.yaml").write_text(base_text, encoding="utf-8")
    base = compose_config("+experiment=_doc_base", conf_dir=conf_copy, root=tmp_path, local=True)
    assert not _missing_keys(snippet, base), f"{block.page}:{block.line}: keys not in the config"
    compose_config("+experiment=_doc", conf_dir=conf_copy, root=tmp_path, local=True)


def test_objective_example_is_an_objective():
    """The objective of docs/extending.md: a (B,) loss whose gradient reaches only the scores."""
    from rag_lightning.models import objectives

    (code,) = [b.text for b in ALL_BLOCKS if b.page == "docs/extending.md" and b.lang == "python"]
    namespace = copy.copy(vars(objectives))
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    assert set(namespace["OBJECTIVES"]) == {*objectives.OBJECTIVES, "my"}
    seq_lp, scores = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    loss = namespace["my_loss"](seq_lp, scores, temperature=0.5)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert scores.grad is not None and seq_lp.grad is None


PIPELINE_PAGES = ["README.md", "docs/evaluation.md"]


@pytest.mark.slow
@pytest.mark.parametrize("page", PIPELINE_PAGES)
def test_python_entry_point_example_runs(page, tiny_run, tmp_path, monkeypatch):
    """The RagPipeline examples, on the module's tiny run, from another folder."""
    (code,) = [b.text for b in ALL_BLOCKS if b.page == page and b.lang == "python"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace(RUN_DIR, str(tiny_run[0])), page, "exec"), namespace)
    assert len(namespace["answers"]) == 2 and all(isinstance(a, str) for a in namespace["answers"])
    (top,) = namespace["passages"]
    assert len(top) == 5 and all(set(p) == {"id", "title", "text", "score"} for p in top)
    if "rows" in namespace:
        (row,) = namespace["rows"]
        assert (
            isinstance(row["prediction"], str)
            and row["passage_ids"]
            and row["question"] == "who wrote hamlet?"
        )
    assert not list(tmp_path.iterdir())


# ---- the commands -----------------------------------------------------------------------------------------


def run_blocks() -> list[Block]:
    """Bash blocks with at least one command to run, each distinct command list once."""
    seen, out = set(), []
    for b in BASH:
        cmds = tuple(bash_commands(b))
        if any(c in RUN for c in cmds) and cmds not in seen:
            seen.add(cmds)
            out.append(b)
    return out


def newest_run(*roots: Path) -> Path:
    runs = [p.parent.parent for r in roots for p in r.glob("logs/**/checkpoints/last.ckpt")]
    assert runs, f"no run with a checkpoint under {roots}"
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").lstat().st_mtime_ns)


def untracked() -> set[str]:
    """The checkout's untracked files that git does not ignore."""
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    return set(proc.stdout.splitlines())


def run_command(cmd: str, tmp: Path, n: int, cache: Path, fallback: Path | None = None) -> str:
    """`cmd` with its RUN overrides, in this process, as `python <script> ...` would run it; its output."""
    tokens = shlex.split(cmd)
    env = {}
    while re.match(r"^[A-Z_]+=", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        env[k] = v
    app = app_and_args(tokens)
    assert app is not None, cmd
    script, args = app
    if any(RUN_DIR in a for a in args):
        run = newest_run(tmp) if list(tmp.glob("logs/**/last.ckpt")) else fallback
        args = [a.replace(RUN_DIR, str(run)) for a in args]
    multirun = "-m" in args or "--multirun" in args
    where = (
        f"hydra.sweep.dir={tmp}/logs/sweep-{n:02d}" if multirun else f"hydra.run.dir={tmp}/logs/run-{n:02d}"
    )
    extra = [a.format(tmp=tmp) for a in RUN[cmd]]
    flags = []  # Hydra's flags first: overrides after `--cfg job` would not parse
    for i, a in enumerate(args):
        if a.startswith("-") or (i and args[i - 1] in ("--cfg", "-c", "--package", "-p")):
            flags.append(a)
    args = [a for a in args if a not in flags]
    overrides = [*args, f"paths.log_dir={tmp}/logs", f"paths.cache_dir={cache}", where, *extra]
    argv = [script if script in MODULE_OF else str(ROOT / script), *flags, *overrides]
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.argv = argv
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if script in MODULE_OF:  # as the console script runs it
                runpy.run_module(MODULE_OF[script], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        assert not e.code, f"{cmd}\nexit {e.code}\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}"
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        GlobalHydra.instance().clear()
    return out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache folder for every command: the tokenized corpus is converted once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache) -> tuple[Path, str]:
    """The README's one-minute run, run once: the blocks that show it use this run (its output folder and log)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    log = run_command(TINY_RUN, tmp, 0, cache)
    return tmp / "logs" / "run-00", log


@pytest.mark.slow
@pytest.mark.parametrize("block", run_blocks(), ids=[f"{b.page}:{b.line}" for b in run_blocks()])
def test_documented_block_runs(block, tmp_path, cache, tiny_run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    before = untracked()
    run_dir, _ = tiny_run
    for n, cmd in enumerate(bash_commands(block)):
        if cmd in SKIP:
            continue
        if cmd == TINY_RUN:  # ran once for the module: its run stands in for this block's
            shutil.copytree(run_dir, tmp_path / "logs" / f"run-{n:02d}", symlinks=True)
            continue
        log = run_command(cmd, tmp_path, n, cache, fallback=run_dir)
        if cmd in EXPECT:
            assert EXPECT[cmd] in log, f"{cmd}: no {EXPECT[cmd]!r} in its output"
    assert untracked() == before, "a documented command wrote into the checkout"


@pytest.mark.slow
def test_a_run_keeps_its_summary_in_train_log_and_last_ckpt_is_a_link(tiny_run):
    """The README's one-minute run, as the user runs it: the summary printed and in train.log, last.ckpt a link
    to the step checkpoint (not a second copy)."""
    run, log = tiny_run
    summary = log[log.index("rag-lightning run summary") : log.index("outputs:")]
    assert summary in (run / "train.log").read_text(encoding="utf-8")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and (run / "checkpoints" / os.readlink(last)).is_file()
    assert torch.load(last, weights_only=True)["global_step"] == 2
