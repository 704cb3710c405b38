"""Running the server: a graceful shutdown (issue 23) — running requests get the grace period, then a
503 in OpenAI's shape (JSON with Retry-After, or an error event then ``[DONE]`` in a stream), waiting
ones a 503 at once, nothing is cut mid-chunk and nothing is logged as an error."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx

from peftkit.serve.limits import ServeLimits

from helpers.serve import PROMPTS, small_server


def _stream(url: str, out: dict) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        out["status"] = response.status_code
        out["lines"] = [line for line in response.iter_lines() if line]


def _post(url: str, out: dict, max_tokens: int, prompt: str = PROMPTS[0]) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    out["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_shutdown_lets_short_requests_finish_and_ends_the_rest_with_503s(serve_files, caplog) -> None:
    limits = ServeLimits(max_new_tokens=300, shutdown_grace_seconds=1.5)
    stream, running, queued, short = {}, {}, {}, {}
    caplog.set_level(logging.WARNING)
    server = small_server(serve_files, max_concurrent=3, limits=limits)
    with server:
        engine = server.engine
        slow = engine.host.model.register_forward_pre_hook(lambda *_: time.sleep(0.03))
        clients = [
            threading.Thread(target=_stream, args=(server.url, stream)),
            threading.Thread(target=_post, args=(server.url, running, 300, PROMPTS[1])),
        ]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 20
        while len(engine.running) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        clients.append(threading.Thread(target=_post, args=(server.url, short, 8)))
        clients[-1].start()
        while len(engine.running) < 3 and "response" not in short and time.monotonic() < deadline:
            time.sleep(0.01)
        clients.append(threading.Thread(target=_post, args=(server.url, queued, 300, PROMPTS[3])))
        clients[-1].start()
        while engine.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert time.monotonic() < deadline, "the requests did not reach the engine in time"
        started = time.monotonic()
    stopped = time.monotonic() - started
    for client in clients:
        client.join(30)
    slow.remove()
    assert stopped < 5  # the grace period and the last events, not uvicorn's own timeout
    assert (
        short["response"].status_code == 200 and short["response"].json()["usage"]["completion_tokens"] == 8
    )
    for ended in (running, queued):
        response = ended["response"]
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "overloaded_error"
    assert stream["status"] == 200 and stream["lines"][-1] == "data: [DONE]"
    error = json.loads(stream["lines"][-2].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert all(json.loads(line.removeprefix("data: ")) for line in stream["lines"][:-1])  # no chunk cut
    assert engine.metrics.failed_streams.labels("shutdown")._value.get() == 1
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
