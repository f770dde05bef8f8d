"""The README's Quick start block runs as written."""

import re

import pytest
from conftest import REPO


def _run_block(heading: str) -> dict:
    """Executes the first python block after ``heading``; returns its namespace."""
    section = (REPO / "README.md").read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.lenient
def test_quick_start_runs():
    namespace = _run_block("## Quick start")
    assert namespace["loss"].shape == ()
    assert "classifier" in namespace["merged"]


@pytest.mark.lenient
def test_gguf_fine_tuning_block_runs():
    """The README's GGUF block: SmolLM2 from its package, one GenLoRA step, a merge."""
    namespace = _run_block("## Fine-tuning any llama GGUF file")
    assert namespace["loss"].shape == () and 0.0 < float(namespace["loss"]) < 20.0
    assert namespace["merged"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (
        576,
        576,
    )


@pytest.mark.lenient
def test_quantized_base_block_runs():
    """The README's 4-bit block: SmolLM2 kept in its GGUF blocks, adapted, called."""
    namespace = _run_block("## A 4-bit base (QLoRA-style)")
    kernel = namespace["base"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.kind == "q4_1"
    assert namespace["logits"].shape[-1] == 49152


def test_lean_block_runs_in_a_fresh_process():
    """The README's `--lean` block, in its own interpreter: the scheduler flag
    must be set before JAX starts, which this test process is past."""
    import subprocess
    import sys

    section = (REPO / "README.md").read_text().split("### Less memory per step", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code += "\nimport os\nprint('LOSS', float(loss), os.environ['XLA_FLAGS'])\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loss, flags = done.stdout.split("LOSS", 1)[1].split(maxsplit=1)
    assert 0.0 < float(loss) < 20.0
    assert "concurrency_optimized_scheduler=false" in flags
