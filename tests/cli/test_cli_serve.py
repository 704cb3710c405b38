"""``peftkit serve``: start-up line, answers, clean stop on SIGTERM; flag errors and the missing extra."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from peftkit.cli import main


def test_serve_starts_answers_and_stops_on_sigterm(serve_files) -> None:
    command = [sys.executable, "-m", "peftkit", "serve", "--model", str(serve_files["base"]), "--port", "0",
               "--adapter", f"alpha={serve_files['alpha']}"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or "http://" not in lines[-1]:
            line = process.stderr.readline()
            assert line, f"the server ended: {lines}"
            lines.append(line)
        url = re.search(r"http://\S+/v1", lines[-1]).group(0)
        with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
            ids = [m["id"] for m in json.load(response)["data"]]
        assert ids == [str(serve_files["base"]), "alpha"]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert "loading" in lines[0]
    assert process.returncode == 0
    rest = process.stderr.read()
    assert "peftkit serve: stopped" in rest and "Traceback" not in rest


def test_ctrl_c_stops_the_server(serve_files) -> None:
    command = [sys.executable, "-m", "peftkit", "serve", "--model", str(serve_files["base"]), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        while "http://" not in (line := process.stderr.readline()):
            assert line, "the server ended"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    rest = process.stderr.read()
    assert "peftkit serve: stopped" in rest and "Traceback" not in rest


def test_serve_without_the_extra_names_the_install_command(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    assert main(["serve"]) == 2
    assert "pip install 'peftkit[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--adapter", "nodir"], "write NAME=DIR"), (["--adapter", "a=/no/such/dir"], "no such directory"),
     (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
     (["--adapter-root", "/no/such/root"], "no such directory")],
)  # fmt: skip
def test_bad_serve_flags_are_one_line_errors(flags, message, capsys) -> None:
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
