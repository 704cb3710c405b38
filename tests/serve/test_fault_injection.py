"""A small fault-injection load (issue 23's target): good and bad requests at once, on one server of its own
on a loopback port. Every good answer equals its single-request answer (offline ``generate``), every bad
one is a 4xx, and nothing is answered or logged as a server error. Bounded: 40 requests, 8 tokens each.
Then faults that strike while requests run (sampling, a prefill group, an adapter's files, clients
leaving): each ends its own request only."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from typing import Any

import httpx

from peftkit.serve.limits import ServeLimits

from helpers.serve import ADAPTERS, PROMPTS, small_server

BAD = [
    {"temperature": 1.0, "seed": 2**64},
    {"temperature": 1.0, "top_p": 1e-300},
    {"max_tokens": 0},
    {"stop": 5},
    {"stop": {"x": 1}},
    {"prompt": ""},
    {"n": 3},
    {"model": "no-such-adapter"},
]
RAW_BAD = [
    b'{"model": "tiny", "prompt": "x\\ud800y"}',
    b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "\xff"}',
    b"not json at all",
]


def test_good_answers_stay_exact_and_bad_requests_are_4xx_under_a_mixed_load(
    serve_files, tokenizer, reference, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    models = itertools.cycle(["tiny", *ADAPTERS])
    good = [
        (next(models), PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(28)
    ]  # (model, prompt, stream)
    limits = ServeLimits(max_new_tokens=64, max_prompt_tokens=64)

    async def send_good(http: httpx.AsyncClient, model: str, prompt: str, stream: bool) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
        if not stream:
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = [line[6:] async for line in response.aiter_lines() if line.startswith("data: {")]
        return "".join(json.loads(chunk)["choices"][0]["text"] for chunk in chunks)

    async def scenario(url: str) -> tuple[list[str], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            good_tasks = [send_good(http, *job) for job in good]
            bad_tasks = [
                http.post(
                    "/v1/completions",
                    json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, **fields},
                )
                for fields in BAD
            ]
            bad_tasks += [
                http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
                for raw in RAW_BAD
            ]
            everything = await asyncio.gather(*good_tasks, *bad_tasks)
        return list(everything[: len(good)]), [response.status_code for response in everything[len(good) :]]

    with small_server(
        serve_files, adapters=ADAPTERS, max_adapters=2, max_concurrent=4, limits=limits
    ) as server:
        texts, bad_statuses = asyncio.run(scenario(server.url))
        metrics = httpx.get(f"{server.url}/metrics").text
    for (model, prompt, _), text in zip(good, texts, strict=True):
        adapter = None if model == "tiny" else model
        want = tokenizer.decode(reference(tokenizer(prompt).input_ids, adapter, 8), skip_special_tokens=True)
        assert text == want, (model, prompt)
    assert all(400 <= status < 500 for status in bad_statuses), bad_statuses
    assert not re.search(r'^peftkit_requests_total\{endpoint="[^"]*",status="5\d\d"\}', metrics, re.M)
    assert "peftkit_failed_streams_total{" not in metrics
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def _poisoned_prefill(tokenizer, good_prompts: list[str]):
    """A forward pre-hook that raises on a prefill holding a token no good prompt has, and that token's
    prompt."""
    poison_prompt = "Zed quux"
    poison = tokenizer(poison_prompt).input_ids[-1]
    assert all(poison not in tokenizer(prompt).input_ids for prompt in good_prompts)

    def explode(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == poison).any()):
            raise RuntimeError("injected prefill failure")

    return explode, poison_prompt


def test_runtime_faults_under_load_end_only_their_own_requests(
    serve_files, tokenizer, reference, tmp_path, monkeypatch, caplog
) -> None:
    """Faults that strike once requests run, all at once with good requests: a row whose sampling fails
    after two tokens (streamed: its tokens, an error event, then ``[DONE]``), a prompt whose prefill
    raises inside a batched group (500 for it alone), an adapter evicted from memory whose files were
    then corrupted (400), clients leaving mid-stream. Every good answer equals its reference, no lease
    is left held, the engine keeps serving and nothing is logged as an error."""
    import shutil

    from peftkit.serve import rows

    caplog.set_level(logging.WARNING)
    real = rows.next_token
    calls: dict[int, int] = {}

    def failing_after_two(logits, params, generator):
        if params.seed == 666:
            calls[id(params)] = calls.get(id(params), 0) + 1
            if calls[id(params)] > 2:
                raise RuntimeError("injected sampling failure")
        return real(logits, params, generator)

    monkeypatch.setattr(rows, "next_token", failing_after_two)
    root = tmp_path / "root"
    shutil.copytree(serve_files["delta"], root / "delta")
    models = itertools.cycle(["tiny", *ADAPTERS])
    good = [(next(models), PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(16)]
    explode, poison_prompt = _poisoned_prefill(tokenizer, list(PROMPTS))
    settings = {"adapter_root": str(root), "max_adapters": 2, "max_cpu_adapters": 3, "max_concurrent": 4}
    limits = ServeLimits(max_new_tokens=64, max_prompt_tokens=64)

    async def stream_lines(http: httpx.AsyncClient, body: dict, keep: int | None = None) -> list[str]:
        lines: list[str] = []
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if keep is not None and len(lines) >= keep:
                    break  # the client leaves mid-stream
        return lines

    async def send_good(http: httpx.AsyncClient, model: str, prompt: str, stream: bool) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        if stream:
            lines = await stream_lines(http, body)
            assert lines[-1] == "data: [DONE]", lines
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    async def scenario(url: str) -> tuple[list[str], list[Any]]:
        base = {"prompt": PROMPTS[1], "max_tokens": 30}
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            faults = [
                stream_lines(http, {**base, "model": "alpha", "temperature": 1.0, "seed": 666}),
                http.post("/v1/completions", json={**base, "model": "beta", "temperature": 1.0, "seed": 666}),
                http.post("/v1/completions", json={**base, "model": "gamma", "prompt": poison_prompt}),
                http.post("/v1/completions", json={**base, "model": "late"}),
                stream_lines(http, {**base, "model": "late"}),
                stream_lines(http, {**base, "model": "alpha", "max_tokens": 60, "temperature": 0}, keep=2),
                stream_lines(http, {**base, "model": "tiny", "max_tokens": 60, "temperature": 0}, keep=2),
            ]
            everything = await asyncio.gather(*(send_good(http, *job) for job in good), *faults)
        return list(everything[: len(good)]), list(everything[len(good) :])

    with small_server(serve_files, adapters=ADAPTERS, limits=limits, **settings) as server:
        engine = server.engine
        loaded = httpx.post(
            f"{server.url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "delta"}
        )
        assert loaded.status_code == 200, loaded.text
        for model in ADAPTERS:  # late, never in a slot, becomes the least recently used: out of memory
            body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 1}
            assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
        assert "late" not in engine.bank.resident_names()
        weights = root / "delta" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:300])
        hook = engine.host.model.register_forward_pre_hook(explode, with_kwargs=True)
        try:
            texts, faults = asyncio.run(scenario(server.url))
        finally:
            hook.remove()
        deadline = time.monotonic() + 20
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        users = list(engine.bank._users)
        after = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "beta", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0},
            timeout=30,
        )
        health = httpx.get(f"{server.url}/health").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    for (model, prompt, _), text in zip(good, texts, strict=True):
        adapter = None if model == "tiny" else model
        want = tokenizer.decode(reference(tokenizer(prompt).input_ids, adapter, 8), skip_special_tokens=True)
        assert text == want, (model, prompt)
    sampled, sampled_whole, poisoned, late, late_stream, left_alpha, left_base = faults
    assert sampled[-1] == "data: [DONE]" and len(sampled) >= 4  # two tokens' chunks, the error, [DONE]
    error = json.loads(sampled[-2][6:])["error"]
    assert error["code"] == 500 and "injected sampling failure" in error["message"]
    assert all("choices" in json.loads(line[6:]) for line in sampled[:-2])
    assert (
        sampled_whole.status_code == 500
        and "injected sampling failure" in sampled_whole.json()["error"]["message"]
    )
    assert poisoned.status_code == 500 and "injected prefill failure" in poisoned.json()["error"]["message"]
    assert late.status_code == 400 and "no longer loads" in late.json()["error"]["message"], late.text
    assert late_stream[-1] == "data: [DONE]" and json.loads(late_stream[-2][6:])["error"]["code"] == 400
    assert len(left_alpha) == len(left_base) == 2
    assert users == [0] * len(users)  # every lease given back, once
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == tokenizer.decode(
        reference(tokenizer(PROMPTS[2]).input_ids, "beta", 8), skip_special_tokens=True
    )
    assert health["status"] == "ok"
    assert re.search(r'peftkit_failed_streams_total\{reason="generation"\} 1\.0', metrics)
    assert re.search(r'peftkit_failed_streams_total\{reason="adapter"\} 1\.0', metrics)
    cancelled = re.findall(
        r'peftkit_requests_finished_total\{adapter="[^"]+",outcome="cancelled"\} (\S+)', metrics
    )
    assert sum(float(count) for count in cancelled) == 2
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
