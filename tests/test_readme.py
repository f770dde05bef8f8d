"""The README's Quick start block runs as written."""

import re

import pytest
from conftest import REPO


@pytest.mark.lenient
def test_quick_start_runs():
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].shape == ()
    assert "classifier" in namespace["merged"]
