"""The scheduler: a full queue answers 429, a client that goes away frees its slot, shutdown never hangs."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx

from helpers.serve import API_KEY, PROMPTS

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _cancelled(server) -> float:
    """The server's count of cancelled requests, from /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^peftkit_requests_cancelled_total (\S+)$", text, re.M).group(1))


def _small_server(serve_files, **settings):
    from peftkit.serve.api import ServeLimits
    from peftkit.serve.server import ServeSettings, ThreadedServer, build_app

    limits = ServeLimits(max_new_tokens=300, max_prompt_tokens=100_000)
    app, engine = build_app(
        ServeSettings(model=str(serve_files["base"]), limits=limits, **settings), base_name="tiny"
    )
    server = ThreadedServer(app)
    server.engine = engine
    return server


def test_a_full_queue_answers_429_with_retry_after(serve_files) -> None:
    with _small_server(serve_files, max_concurrent=1, max_queue=1) as server:
        engine = server.engine
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                with engine.lock:  # the engine cannot admit or step: the first request stays queued
                    first = asyncio.create_task(http.post("/v1/completions", json=body))
                    for _ in range(500):
                        if engine.waiting == 1:
                            break
                        await asyncio.sleep(0.01)
                    refused = await http.post("/v1/completions", json=body)
                return refused, await first

        refused, served = asyncio.run(scenario())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4


def test_a_prompt_longer_than_the_model_takes_is_400(serve_files) -> None:
    with _small_server(serve_files) as server:  # --max-prompt-tokens far above the model's 512 positions
        body = {"model": "tiny", "prompt": "Alice " * 600, "max_tokens": 2}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and "above the limit of 511" in response.json()["error"]["message"]


def test_a_client_that_disconnects_frees_its_slot(server) -> None:
    engine = server.engine
    cancelled_before = _cancelled(server)
    slow = engine.model.get_base_model().register_forward_pre_hook(lambda *_: time.sleep(0.02))
    body = {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 150, "temperature": 0, "stream": True}
    try:
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30
        ) as r:
            lines = r.iter_lines()  # kept: a closed line iterator closes the response
            assert next(lines).startswith("data: ")
            engine.lock.acquire()  # pause the engine between two steps
            assert len(engine.running) == 1 and not engine.running[0].cancelled
        try:  # the response is closed: the server sees the disconnect and cancels the request
            assert _wait_for(lambda: len(engine.running) == 1 and engine.running[0].cancelled)
            job = engine.running[0]
        finally:
            engine.lock.release()
        assert _wait_for(lambda: not engine.running)
        assert len(job.generated) < 150
        assert _cancelled(server) == cancelled_before + 1
    finally:
        slow.remove()


def test_a_queued_request_whose_client_leaves_is_dropped(server) -> None:
    engine = server.engine
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    with engine.lock:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30):
            assert _wait_for(lambda: engine.waiting == 1)
        assert _wait_for(lambda: engine.waiting == 0)


def test_stopping_the_server_ends_a_running_stream(serve_files) -> None:
    server = _small_server(serve_files, max_concurrent=2)
    lines: list[str] = []
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 300, "temperature": 0, "stream": True}

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
                lines.extend(response.iter_lines())
        except httpx.HTTPError:
            lines.append("closed")

    with server:
        client = threading.Thread(target=stream)
        client.start()
        assert _wait_for(lambda: bool(server.engine.running))
        started = time.monotonic()
    client.join(30)
    assert not client.is_alive()
    assert time.monotonic() - started < 15
    assert lines


def test_requests_queued_together_are_prefilled_in_one_padded_batch(server, tokenizer, reference) -> None:
    """Prompts of different lengths and adapters, held in the queue and then admitted at once (one
    left-padded prefill), each give their own offline greedy answer."""
    engine = server.engine
    jobs = [("alpha", PROMPTS[0]), ("tiny", PROMPTS[3]), ("beta", PROMPTS[1]), ("alpha", PROMPTS[3])]

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as http:
            with engine.lock:
                tasks = [
                    asyncio.create_task(
                        http.post(
                            "/v1/completions",
                            json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
                        )
                    )
                    for model, prompt in jobs
                ]
                for _ in range(500):
                    if engine.waiting == len(jobs):
                        break
                    await asyncio.sleep(0.01)
                assert engine.waiting == len(jobs)
            return [(await task).json()["choices"][0]["text"] for task in tasks]

    got = asyncio.run(scenario())
    want = [
        tokenizer.decode(
            reference(tokenizer(prompt).input_ids, None if model == "tiny" else model, 8),
            skip_special_tokens=True,
        )
        for model, prompt in jobs
    ]
    assert got == want
    assert len({len(tokenizer(prompt).input_ids) for _, prompt in jobs}) > 1  # padding was needed
