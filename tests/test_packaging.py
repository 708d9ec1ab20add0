"""Packaging: every declared console script runs `--help` (from the tree and from a built wheel installed outside
the checkout, run from another folder), so do `train.py` and every script in scripts/ and benchmarks/, the
wheel ships the configs, and the import layering (data/ does not
import model code; no encoders <-> tiny loop)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rag_lightning import cli

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
HYDRA_APPS = {"rag-train", "rag-evaluate", "rag-build-index", "rag-export", "rag-eval-retrieval"}
COMMANDS = {*HYDRA_APPS, "rag-eval-kilt"}  # docs/evaluation.md: every tool a command


def _help_ok(name: str, stdout: str) -> bool:
    """A Hydra app's help lists the config groups (so they were found); an argparse command prints usage."""
    return "hparams_search: optuna" in stdout if name in HYDRA_APPS else stdout.startswith(f"usage: {name}")


def _python(code: str, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_runs_help(name: str, tmp_path: Path):
    module, func = SCRIPTS[name].split(":")
    proc = _python(
        f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {func}; {func}()", tmp_path, ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _help_ok(name, proc.stdout), proc.stdout[-2000:]


# _*.py are libraries the scripts import, not scripts
RUNNABLE = ["train.py", *sorted(p.relative_to(ROOT).as_posix() for d in ("scripts", "benchmarks")
                                for p in (ROOT / d).glob("[!_]*.py"))]  # fmt: skip


def test_every_tool_is_a_console_script():
    assert set(SCRIPTS) == COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("script", RUNNABLE)
def test_script_runs_help(script: str, tmp_path: Path):
    """`python <script> --help` exits 0, prints its usage (argparse) or the Hydra app's help, writes nothing."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    hydra_help = "Use --hydra-help to view Hydra specific help" in proc.stdout
    assert proc.stdout.startswith("usage: ") or hydra_help, proc.stdout[-2000:]
    assert not list(cwd.iterdir())  # no run directory, no outputs


def test_declared_packages_cover_the_source_tree():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rag_lightning").rglob("__init__.py")
    }
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found <= declared, f"add to [tool.setuptools] packages: {sorted(found - declared)}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["rag_lightning.conf"] == "conf"


def test_conf_dir_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert Path(cli.conf_dir()) == ROOT / "conf"  # source tree
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "rag_lightning" / "cli.py"))
    with pytest.raises(
        FileNotFoundError, match="neither .*rag_lightning/conf .*installed package.* nor .*conf"
    ):
        cli.conf_dir()


def test_data_does_not_import_model_code_and_tiny_does_not_import_encoders(tmp_path: Path):
    code = (
        "import sys\n"
        "import rag_lightning.data.datamodule, rag_lightning.data\n"
        "assert 'rag_lightning.models.tiny' not in sys.modules, 'data/ imports models/tiny.py'\n"
        "import rag_lightning.models.tiny\n"
        "assert 'rag_lightning.models.encoders' not in sys.modules, 'models/tiny.py imports encoders'\n"
        "rag_lightning.data.load_tokenizer('tiny:bert')\n"
    )
    proc = _python(code, tmp_path, ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_wheel_ships_conf_and_its_console_scripts_run_help(tmp_path: Path):
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to the sources
    ignore = shutil.ignore_patterns("__pycache__", "local")
    for name in ("rag_lightning", "hydra_plugins", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "conf" / "local").mkdir(exist_ok=True)  # a machine's own paths: never shipped
    (src / "conf" / "local" / "default.yaml").write_text("# @package _global_\npaths:\n  data_dir: /mine\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    shipped = {
        p.relative_to(site / "rag_lightning" / "conf")
        for p in (site / "rag_lightning" / "conf").rglob("*.yaml")
    }
    in_tree = {p.relative_to(src / "conf") for p in (src / "conf").rglob("*.yaml")}
    assert shipped == {p for p in in_tree if p.parts[0] != "local"} and Path("data/base.yaml") in shipped
    assert (site / "hydra_plugins" / "rag_lightning_sweeper.py").is_file()
    proc = _python("import rag_lightning.cli as c; print(c.conf_dir())", tmp_path, site)
    assert proc.stdout.strip() == str(site / "rag_lightning" / "conf"), proc.stderr[-2000:]
    for name in SCRIPTS:
        run = subprocess.run([str(site / "bin" / name), "--help"], cwd=tmp_path, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)},
                             timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert _help_ok(name, run.stdout), run.stdout[-2000:]
