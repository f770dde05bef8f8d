"""The notebooks in notebooks/: each runs top to bottom, and git holds them without outputs.

Each notebook executes in a fresh kernel of this interpreter (the ``python3``
kernelspec that ipykernel installs under ``sys.prefix``), in an empty working
directory. The Colab notebook runs on two virtual CPU devices, so its sharded
step really splits the batch and the base kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")
manager = pytest.importorskip("jupyter_client.manager")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"analysis", "colab_tpu_finetune", "quickstart"}


def test_expected_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is None, f"{path.name} cell {i}: execution_count is set"
            assert cell.outputs == [], f"{path.name} cell {i}: has outputs; clear them"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "2602.05709" in first.source, path.name


def test_python3_kernel_runs_this_interpreter():
    """'python' in the kernelspec's argv is replaced by sys.executable at launch."""
    km = manager.KernelManager(kernel_name="python3")
    argv = km.format_kernel_cmd()
    assert Path(argv[0]).resolve() == Path(sys.executable).resolve(), (argv, sys.executable)
    spec = kernelspec.KernelSpecManager().find_kernel_specs()["python3"]
    assert Path(spec).is_relative_to(Path(sys.prefix)), (spec, sys.prefix)


@pytest.mark.lenient
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile.mkdtemp() lands here
    data = REPO.parent / "shared" / "data"
    if "GENLORA_DATA" not in os.environ and data.is_dir():
        monkeypatch.setenv("GENLORA_DATA", str(data))
    if path.stem == "colab_tpu_finetune":
        flags = os.environ.get("XLA_FLAGS", "")
        monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_force_host_platform_device_count=2")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )
    assert text, f"{path.name} printed nothing"
    if path.stem == "colab_tpu_finetune":
        assert "2 device(s)" in text and "adapters stay replicated: True" in text, text
    if path.stem == "quickstart":
        assert "identical: True" in text, text
