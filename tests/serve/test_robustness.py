"""Issue 23: a server one client cannot break. Each test here failed on the code before it (checked once
against that commit): bad settings that failed their neighbours, a use count released twice, an evicted
adapter whose files went bad, reloads skipping the root's checks, tokenizing on the event loop, 500s
that should be 400s, health that always said ok, metrics without adapters or failed streams."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from helpers.serve import API_KEY, PROMPTS, small_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _want(tokenizer, reference, prompt: str, adapter: str | None, max_tokens: int) -> str:
    return tokenizer.decode(
        reference(tokenizer(prompt).input_ids, adapter, max_tokens), skip_special_tokens=True
    )


async def _stream_text(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> str:
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


def test_bad_sampling_settings_never_fail_their_neighbours(server, tokenizer, reference) -> None:
    """Innocent greedy streams run while other clients send settings that once made the engine raise:
    every innocent answer equals its reference; tiny temperatures are greedy, the rest are 400s."""
    innocents = [("alpha", PROMPTS[0]), ("tiny", PROMPTS[1]), ("beta", PROMPTS[2])]
    bad = [
        ({"temperature": 8e-38}, 200),
        ({"temperature": 1e-45}, 200),
        ({"temperature": 1.0, "seed": 18446744073709551616}, 400),
        ({"temperature": 1.0, "top_p": 1e-300}, 400),
        ({"prompt": ""}, 400),
    ]

    async def scenario() -> tuple[list[str], list[httpx.Response]]:
        async with (
            openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60
            ) as client,
            httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as http,
        ):
            streams = [asyncio.create_task(_stream_text(client, m, p, 40)) for m, p in innocents]
            await asyncio.sleep(0.05)
            bodies = [
                {"model": "gamma", "prompt": PROMPTS[3], "max_tokens": 20, **fields} for fields, _ in bad
            ]
            answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
            return await asyncio.gather(*streams), answers

    texts, answers = asyncio.run(scenario())
    for (model, prompt), text in zip(innocents, texts, strict=True):
        assert text == _want(tokenizer, reference, prompt, None if model == "tiny" else model, 40)
    assert [answer.status_code for answer in answers] == [status for _, status in bad]
    greedy = _want(tokenizer, reference, PROMPTS[3], "gamma", 20)
    assert [answer.json()["choices"][0]["text"] for answer in answers[:2]] == [greedy, greedy]


def test_a_row_that_ends_on_its_first_token_beside_another_releases_its_adapter_once(serve_files) -> None:
    """Two requests prefilled together on one adapter, one ending on its first token: before, the other
    one's failure released the first one's use a second time and the adapter could never be unloaded
    (409, "in use by -1")."""
    bodies = [
        {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0},
        {"model": "alpha", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 8e-38},
    ]
    with small_server(serve_files, adapters=("alpha",)) as server:
        engine = server.engine

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                with engine.host.lock:  # queued together: one prefill
                    tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for body in bodies]
                    for _ in range(500):
                        if engine.waiting == len(bodies):
                            break
                        await asyncio.sleep(0.01)
                return list(await asyncio.gather(*tasks))

        answers = asyncio.run(scenario())
        unloaded = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}, timeout=30)
    assert [answer.status_code for answer in answers] == [200, 200]
    assert unloaded.status_code == 200, unloaded.text


def _root_with(serve_files, tmp_path: Path, names: tuple[str, ...]) -> Path:
    root = tmp_path / "root"
    for name in names:
        shutil.copytree(serve_files[name], root / name)
    return root


def _complete(server, model: str, prompt: str = PROMPTS[0], max_tokens: int = 6) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=20)


def test_an_evicted_adapter_whose_files_went_bad_is_served_from_memory(
    serve_files, tmp_path, tokenizer, reference
) -> None:
    """``--max-adapters 1``: tb is evicted from its slot, its safetensors corrupted, then asked for again.
    Before: the reload raised, the request stayed at the head of the queue and was retried in a hot loop
    (nothing served). Now: evicted adapters stay checked in memory and are not read again."""
    root = _root_with(serve_files, tmp_path, ("alpha",))
    with small_server(serve_files, adapters=("beta",), adapter_root=str(root), max_adapters=1) as server:
        loaded = httpx.post(
            f"{server.url}/v1/load_lora_adapter", json={"lora_name": "tb", "lora_path": "alpha"}
        )
        assert loaded.status_code == 200, loaded.text
        assert _complete(server, "tb").json()["choices"][0]["text"] == _want(
            tokenizer, reference, PROMPTS[0], "alpha", 6
        )
        assert _complete(server, "beta").status_code == 200  # tb leaves the slot
        weights = root / "alpha" / "adapter_model.safetensors"
        weights.write_bytes(b"\x00" * 100)
        again = _complete(server, "tb")
        base = _complete(server, "tiny", PROMPTS[1])
        health = httpx.get(f"{server.url}/health")
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == _want(
        tokenizer, reference, PROMPTS[0], "alpha", 6
    )
    assert base.status_code == 200 and health.status_code == 200


@pytest.mark.parametrize("damage", ["corrupted", "symlink out of the root", "rank 16 over rank 8"])
def test_a_reload_after_eviction_runs_every_check_on_what_it_reads(serve_files, tmp_path, damage) -> None:
    """With one adapter kept in memory, an evicted adapter is read again, with the registration's checks:
    a weights file swapped for a link out of the root (served before), a rank-16 adapter copied over the
    rank-8 one despite --max-rank 8 (served before), a corrupted file (a hot loop before) are 400s, and
    the server goes on."""
    root = _root_with(serve_files, tmp_path, ("alpha",))
    settings = {"adapter_root": str(root), "max_adapters": 1, "max_cpu_adapters": 1, "max_rank": 8}
    with small_server(serve_files, adapters=("beta",), **settings) as server:
        assert (
            httpx.post(
                f"{server.url}/v1/load_lora_adapter", json={"lora_name": "tb", "lora_path": "alpha"}
            ).status_code
            == 200
        )
        assert _complete(server, "tb").status_code == 200
        assert _complete(server, "beta").status_code == 200  # tb leaves the slot, and memory
        weights = root / "alpha" / "adapter_model.safetensors"
        if damage == "corrupted":
            weights.write_bytes(weights.read_bytes()[:300])
        elif damage == "symlink out of the root":
            weights.unlink()
            weights.symlink_to(serve_files["gamma"] / "adapter_model.safetensors")
        else:
            shutil.rmtree(root / "alpha")
            shutil.copytree(serve_files["wide"], root / "alpha")
        refused = _complete(server, "tb")
        after = _complete(server, "beta", PROMPTS[1])
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert after.status_code == 200


def test_prompts_are_tokenized_off_the_event_loop_and_huge_ones_refused_before(server, monkeypatch) -> None:
    """Before: the handler tokenized on the event loop (eight ~1 MB prompts stalled /health for 9 s) and
    before any length check."""
    tokenizer = server.engine.host.tokenizer
    calls: list[tuple[str, int]] = []
    real = type(tokenizer).__call__

    def recording(self, text, *args, **kwargs):
        calls.append((threading.current_thread().name, len(text)))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    huge = {"model": "tiny", "prompt": "Alice " * 150_000, "max_tokens": 2}  # 900 kB, under the body limit

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as http:
            return list(await asyncio.gather(*(http.post("/v1/completions", json=huge) for _ in range(4))))

    refused = asyncio.run(scenario())
    ok = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2},
        headers=HEADERS,
    )
    assert [r.status_code for r in refused] == [400] * 4
    assert all("bytes, above the limit" in r.json()["error"]["message"] for r in refused)
    assert ok.status_code == 200
    assert calls and all(size < 1000 for _, size in calls)  # the huge prompts never reached the tokenizer
    assert server._thread.name not in {name for name, _ in calls}  # not the server's event loop


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_max_tokens_zero_is_400_not_the_default(client, endpoint) -> None:
    with pytest.raises(openai.BadRequestError, match="must be between 1 and"):
        if endpoint == "chat":
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=0
            )
        else:
            client.completions.create(model="tiny", prompt="hi", max_tokens=0)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "prompt": "hi", "stop": 5}',
        b'{"model": "tiny", "prompt": "hi", "stop": true}',
        b'{"model": "tiny", "prompt": "hi", "stop": {"x": 1}}',
        b'{"model": "tiny", "prompt": "x\\ud800y", "max_tokens": 2}',
        b'{"model": "tiny", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
    ],
    ids=["stop-int", "stop-bool", "stop-object", "lone-surrogate", "deep-nesting", "bad-utf8"],
)
def test_malformed_values_are_400_not_500(server, raw: bytes) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions", content=raw, headers={**HEADERS, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_defaults_some_clients_send_are_accepted(client) -> None:
    got = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=2, extra_body={"logprobs": False, "tools": []}
    )
    assert got.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=False, tools=[]
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("corrupted", "not a complete safetensors file"),
        ("truncated", "not a complete safetensors file"),
        ("r: eight", "positive integers"),
        ("target_modules: 12", "target_modules must be"),
        ("lora_alpha: x", "lora_alpha must be a number"),
    ],
)
def test_bad_adapter_files_and_config_values_are_400_at_registration(
    server, serve_files, damage, reason
) -> None:
    directory = serve_files["root"] / f"damaged-{damage.split(':')[0].replace(' ', '-')}"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(serve_files["alpha"], directory)
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    if damage == "corrupted":
        weights.write_bytes(bytes(range(256)) * 4)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        key, value = damage.split(": ")
        config.write_text(json.dumps({**json.loads(config.read_text()), key: 12 if value == "12" else value}))
    body = {"lora_name": "damaged", "lora_path": directory.name}
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, headers=HEADERS, timeout=30)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]
    assert "damaged" not in server.engine.bank.names()


def test_health_says_stalled_while_the_engine_makes_no_progress(serve_files) -> None:
    with small_server(serve_files) as server:
        engine = server.engine
        engine.stalled_after = 0.3
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        with engine.host.lock:
            waiting = threading.Thread(target=_complete, args=(server, "tiny"))
            waiting.start()
            deadline = time.monotonic() + 10
            while (
                health := httpx.get(f"{server.url}/health")
            ).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
        waiting.join(30)
        after = httpx.get(f"{server.url}/health")
    assert (
        health.status_code == 503 and health.json()["status"] == "stalled" and health.json()["waiting"] == 1
    )
    assert after.status_code == 200 and after.json()["status"] == "ok"


def test_metrics_count_per_adapter_cancelled_tokens_running_and_adapter_moves(server, client) -> None:
    client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    body = {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=30
    ) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        next(lines)
    deadline = time.monotonic() + 10
    text = ""
    while 'adapter="beta",outcome="cancelled"' not in text and time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        time.sleep(0.05)
    assert re.search(r'^peftkit_completion_tokens_total\{adapter="gamma"\} [1-9]', text, re.M)
    assert re.search(
        r'^peftkit_requests_finished_total\{adapter="beta",outcome="cancelled"\} [1-9]', text, re.M
    )
    assert re.search(
        r'^peftkit_completion_tokens_total\{adapter="beta"\} [1-9]', text, re.M
    )  # its tokens count
    assert re.search(r'^peftkit_request_latency_seconds_count\{adapter="beta"\} [1-9]', text, re.M)
    for name in ("peftkit_running_requests", "peftkit_adapter_reads_total",
                 "peftkit_adapter_placements_total", "peftkit_adapter_evictions_total",
                 "peftkit_adapters_resident"):  # fmt: skip
        assert name in text
