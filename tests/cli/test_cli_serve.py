"""``peftkit serve``: start-up line, answers, a graceful stop on SIGTERM (in-flight requests end with a 503,
no traceback); ``--threads``; flag errors and the missing extra."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import httpx
import pytest

from peftkit.cli import main


def test_serve_starts_answers_and_stops_gracefully_on_sigterm(serve_files) -> None:
    """A stream running when SIGTERM arrives ends with an error event and ``[DONE]`` after the grace
    period; before, it was cut mid-way and the log held a traceback per request."""
    command = [sys.executable, "-m", "peftkit", "serve", "--model", str(serve_files["base"]), "--port", "0",
               "--adapter", f"alpha={serve_files['alpha']}", "--shutdown-grace", "0.5",
               "--max-new-tokens", "500", "--threads", "1"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while not lines or "http://" not in lines[-1]:
            line = process.stderr.readline()
            assert line, f"the server ended: {lines}"
            lines.append(line)
        url = re.search(r"http://\S+/v1", lines[-1]).group(0)
        with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
            ids = [m["id"] for m in json.load(response)["data"]]
        assert ids == [str(serve_files["base"]), "alpha"]
        body = {"model": "alpha", "prompt": "Alice", "max_tokens": 500, "temperature": 0, "stream": True}
        received: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    received.append(line)
                    started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        client.join(30)
    finally:
        process.kill()
    assert "loading" in lines[0]
    assert process.returncode == 0
    rest = process.stderr.read()
    assert "peftkit serve: stopped" in rest and "Traceback" not in rest and "ERROR" not in rest
    events = [line for line in received if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 503


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
     (["--read-timeout", "0"], "--read-timeout must be above 0"),
     (["--threads", "-1"], "--threads must be 0"),
     (["--max-adapters", "4", "--max-cpu-adapters", "2"], "--max-cpu-adapters 2 is below --max-adapters 4"),
     (["--adapter-root", "/no/such/root"], "no such directory")],
)  # fmt: skip
def test_bad_serve_flags_are_one_line_errors(flags, message, capsys) -> None:
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_threads_sets_the_cpu_threads_before_the_model_loads(monkeypatch) -> None:
    import torch

    from peftkit.serve import server

    def refuse(host, port):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(server, "bind", refuse)
    before = torch.get_num_threads()
    try:
        assert main(["serve", "--threads", "1", "--port", "1"]) == 2  # stops at the socket, after the threads
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
