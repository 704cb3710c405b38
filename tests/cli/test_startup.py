"""Start-up: ``import peftkit``, ``--help`` and argument errors answer before torch and transformers load.

Checked by what a fresh interpreter has imported (not by timing): torch alone takes about a second.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "accelerate", "fastapi", "uvicorn")
PROBE = """
import contextlib, io, json, sys
argv = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    if argv is None:
        import peftkit
    else:
        from peftkit.cli import main
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps([name for name in json.loads(sys.argv[2]) if name in sys.modules]))
"""


def heavy_modules_loaded(argv: list[str] | None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


COMMANDS = [
    "train",
    "eval",
    "generate",
    "merge",
    "combine",
    "inspect",
    "estimate",
    "compare",
    "serve",
    "export",
]


@pytest.mark.parametrize(
    "argv",
    [
        None,
        [],
        ["--help"],
        *([command, "--help"] for command in COMMANDS),
        ["eval", "run", "--exmaples", "3"],
    ],
    ids=lambda argv: "import peftkit" if argv is None else " ".join(argv) or "peftkit",
)
def test_nothing_heavy_is_imported(argv: list[str] | None) -> None:
    assert heavy_modules_loaded(argv) == []


def test_the_probe_sees_heavy_imports() -> None:
    # the check above can fail: using the API does import torch
    out = subprocess.run(
        [sys.executable, "-c", "import sys, peftkit; peftkit.LoraConfig; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "True"


def test_importing_the_integrations_package_loads_no_trainer() -> None:
    """``peftkit.integrations`` names its trainers lazily: transformers and TRL load on first use."""
    code = (
        "import json, sys, peftkit.integrations as integrations; loaded = lambda: "
        "[name for name in ('torch', 'transformers', 'trl') if name in sys.modules]; before = loaded(); "
        "integrations.Trainer; print(json.dumps([before, loaded()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = json.loads(out)
    assert before == []
    assert after == ["torch", "transformers"], "the check can fail: Trainer does need them"
