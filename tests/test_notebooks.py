"""Both notebooks run top to bottom (nbclient) from the notebooks folder, as `jupyter execute` runs them, and
leave nothing untracked in the checkout (they write into a temporary folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_without_outputs():
    import nbformat

    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_inspect_retrieval.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


def untracked() -> set[str] | None:
    """The checkout's untracked files that git does not ignore (None outside a git checkout)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return set(proc.stdout.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RAG_LIGHTNING_ROOT", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads: ~10x slower on a busy CPU
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("RAG_NOTEBOOK_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's own temporary folder lands here
    before = untracked()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    assert untracked() == before  # nothing written into the checkout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rag-lightning-notebook-")]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Q:" in text  # printed retrievals
    assert not (ROOT / "notebooks" / "quickstart").exists() and not (ROOT / "notebooks" / "inspect").exists()
