"""A small fault-injection load (issue 23's target): good and bad requests at once, on one server of its own
on a loopback port. Every good answer equals its single-request answer (offline ``generate``), every bad
one is a 4xx, and nothing is answered or logged as a server error. Bounded: 40 requests, 8 tokens each."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re

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
