"""The scheduler: a full queue answers 429, a client that goes away frees its slot, shutdown never hangs."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx

from peftkit.serve.limits import ServeLimits

from helpers.serve import API_KEY, PROMPTS, ask, engine_for, small_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _cancelled(server, adapter: str) -> float:
    """The server's count of cancelled requests on ``adapter``, from /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    pattern = rf'^peftkit_requests_finished_total{{adapter="{adapter}",outcome="cancelled"}} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def _small_server(serve_files, **settings):
    return small_server(
        serve_files, limits=ServeLimits(max_new_tokens=300, max_prompt_tokens=100_000), **settings
    )


def test_a_full_queue_answers_429_with_retry_after(serve_files) -> None:
    with _small_server(serve_files, max_concurrent=1, max_queue=1) as server:
        engine = server.engine
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                with engine.host.lock:  # the engine cannot admit or step: the first request stays queued
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
    cancelled_before = _cancelled(server, "beta")
    slow = engine.host.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    body = {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 150, "temperature": 0, "stream": True}
    try:
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30
        ) as r:
            lines = r.iter_lines()  # kept: a closed line iterator closes the response
            assert next(lines).startswith("data: ")
            engine.host.lock.acquire()  # pause the engine between two steps
            assert len(engine.running) == 1 and not engine.running[0].request.cancelled
        try:  # the response is closed: the server sees the disconnect and cancels the request
            assert _wait_for(lambda: len(engine.running) == 1 and engine.running[0].request.cancelled)
            row = engine.running[0]
        finally:
            engine.host.lock.release()
        assert _wait_for(lambda: not engine.running)
        assert len(row.generated) < 150 and row.ended
        assert _cancelled(server, "beta") == cancelled_before + 1
    finally:
        slow.remove()


def test_a_queued_request_whose_client_leaves_is_dropped(server) -> None:
    engine = server.engine
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    with engine.host.lock:
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
            with engine.host.lock:
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


# ----------------------------------------------------------------------------- the engine alone (no HTTP)
def _greedy_text(tokenizer, reference, prompt: str, adapter: str | None, max_tokens: int) -> str:
    return tokenizer.decode(
        reference(tokenizer(prompt).input_ids, adapter, max_tokens), skip_special_tokens=True
    )


def test_the_engine_alone_answers_mixed_requests_as_offline_generate(
    serve_files, tokenizer, reference
) -> None:
    engine = engine_for(serve_files, max_adapters=2)
    jobs = [
        ("alpha", PROMPTS[0]),
        (None, PROMPTS[1]),
        ("beta", PROMPTS[2]),
        ("gamma", PROMPTS[3]),
        ("alpha", PROMPTS[1]),
    ]
    engine.start()
    try:
        asked = [ask(engine, tokenizer(prompt).input_ids, adapter, max_tokens=10) for adapter, prompt in jobs]
        assert all(collected.done.wait(60) for _, collected in asked)
    finally:
        engine.stop()
    for (adapter, prompt), (_, collected) in zip(jobs, asked, strict=True):
        assert collected.final.error is None
        assert collected.text == _greedy_text(tokenizer, reference, prompt, adapter, 10), adapter
    assert engine.bank._users == [0] * len(engine.bank._users)  # every lease given back


def test_a_row_whose_sampling_fails_ends_alone_and_the_engine_goes_on(
    serve_files, tokenizer, reference, monkeypatch
) -> None:
    """Before: the engine failed every running row when one row's sampling raised."""
    from peftkit.serve import rows

    real = rows.next_token

    def failing(logits, params, generator):
        if params.seed == 666 and params.temperature > 0:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(rows, "next_token", failing)
    engine = engine_for(serve_files)
    engine.start()
    try:
        innocent = [
            ask(engine, tokenizer(p).input_ids, a, max_tokens=12)
            for a, p in (("alpha", PROMPTS[0]), (None, PROMPTS[1]))
        ]
        bad = ask(engine, tokenizer(PROMPTS[2]).input_ids, "beta", max_tokens=12, temperature=1.0, seed=666)
        assert all(c.done.wait(60) for _, c in [*innocent, bad])
        after = ask(engine, tokenizer(PROMPTS[3]).input_ids, "beta", max_tokens=5)
        assert after[1].done.wait(60)
    finally:
        engine.stop()
    assert bad[1].final.error is not None and "generation failed for this request" in bad[1].final.error
    for (adapter, prompt), (_, collected) in zip(
        (("alpha", PROMPTS[0]), (None, PROMPTS[1])), innocent, strict=True
    ):
        assert collected.final.error is None and collected.text == _greedy_text(
            tokenizer, reference, prompt, adapter, 12
        )
    assert after[1].text == _greedy_text(tokenizer, reference, PROMPTS[3], "beta", 5)
    assert engine.bank._users == [0] * len(engine.bank._users)


def test_a_prefill_that_fails_for_one_row_fails_that_row_only(serve_files, tokenizer, reference) -> None:
    """A forward that raises whenever a poisoned prompt is in the batch: the group's prefill is retried row
    by row, and only the poisoned row ends."""
    engine = engine_for(serve_files)
    poison = tokenizer("Dan").input_ids[-1]

    def explode(module, args, kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise RuntimeError("boom")

    hook = engine.host.model.register_forward_pre_hook(explode, with_kwargs=True)
    jobs = [("alpha", PROMPTS[0]), ("beta", "Dan"), (None, PROMPTS[2])]
    try:
        with engine.host.lock:  # queued together: one prefill group
            engine.start()
            asked = [
                ask(engine, tokenizer(prompt).input_ids, adapter, max_tokens=6) for adapter, prompt in jobs
            ]
            assert _wait_for(lambda: engine.waiting == len(jobs))
        assert all(c.done.wait(60) for _, c in asked)
    finally:
        engine.stop()
        hook.remove()
    assert "boom" in asked[1][1].final.error
    for index in (0, 2):
        adapter, prompt = jobs[index]
        assert asked[index][1].text == _greedy_text(tokenizer, reference, prompt, adapter, 6)


def test_the_cache_is_passed_under_the_name_the_model_takes(serve_files, tokenizer, reference) -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns at every forward): a
    model whose forward takes ``cache`` gets it under that name."""
    import inspect

    engine = engine_for(serve_files, adapters=("alpha",))
    model = engine.host.model
    original = type(model).forward

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        logits_to_keep=0,
    ):
        return original(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )

    model.forward = forward.__get__(model)
    from peftkit.serve.host import ModelHost

    engine.host = ModelHost(model, engine.host.tokenizer)  # reads the forward's parameters
    engine.host.context = engine.bank.slots.routes[next(iter(engine.bank.slots.routes))].context
    assert "cache" in inspect.signature(model.forward).parameters
    engine.start()
    try:
        _, collected = ask(engine, tokenizer(PROMPTS[0]).input_ids, "alpha", max_tokens=6)
        assert collected.done.wait(60)
    finally:
        engine.stop()
    assert collected.final.error is None
    assert collected.text == _greedy_text(tokenizer, reference, PROMPTS[0], "alpha", 6)


def test_health_says_stalled_and_draining_and_drain_ends_what_is_left(serve_files, tokenizer) -> None:
    engine = engine_for(serve_files, adapters=("alpha",))
    engine.stalled_after = 0.2
    engine.start()
    try:
        assert engine.health()["status"] == "ok"
        with engine.host.lock:  # work waits and nothing moves
            _, queued = ask(engine, tokenizer(PROMPTS[0]).input_ids, "alpha", max_tokens=4)
            assert _wait_for(lambda: engine.health()["status"] == "stalled")
        assert queued.done.wait(60) and queued.final.error is None
        assert engine.health()["status"] == "ok"
        slow = engine.host.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
        _, running = ask(engine, tokenizer(PROMPTS[1]).input_ids, None, max_tokens=300)
        assert _wait_for(lambda: bool(engine.running) and len(engine.running[0].generated) > 2)
        row = engine.running[0]
        with engine.host.lock:
            _, waiting = ask(engine, tokenizer(PROMPTS[2]).input_ids, None, max_tokens=4)
            engine.drain(0.3)
            assert engine.health()["status"] == "draining"
            assert waiting.done.wait(5) and waiting.final.status == 503  # the queued one: at once
        assert running.done.wait(30) and running.final.status == 503  # the running one: after the grace
        assert row.ended and 2 < len(row.generated) < 300  # it ran meanwhile, and was cut short
        slow.remove()
    finally:
        engine.stop()
    assert engine.health()["status"] == "stopped"
