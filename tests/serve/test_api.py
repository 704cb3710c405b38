"""The HTTP API through the official ``openai`` client against a live server on a loopback port: answers
equal offline ``PeftModel.generate`` token for token, per adapter and for the base; streaming; errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from helpers.serve import ADAPTERS, API_KEY, PROMPTS

MAX_TOKENS = 12
MODELS = ("tiny", *ADAPTERS)  # "tiny": the base model


def _adapter(model: str) -> str | None:
    return None if model == "tiny" else model


def _chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def test_models_lists_the_base_and_each_adapter_with_its_parent(client) -> None:
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) >= set(MODELS)
    assert getattr(listed["tiny"], "parent", None) is None
    assert all(getattr(listed[name], "parent", None) == "tiny" for name in ADAPTERS)


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_offline_generate(client, tokenizer, reference, model) -> None:
    for prompt in PROMPTS[:2]:
        want = reference(tokenizer(prompt).input_ids, _adapter(model), MAX_TOKENS)
        got = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert got.model == model
        assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
        assert got.usage.completion_tokens == len(want)
        assert got.usage.prompt_tokens == len(tokenizer(prompt).input_ids)


def test_the_references_differ_so_a_leaked_adapter_would_show(tokenizer, reference) -> None:
    ids = tokenizer(PROMPTS[0]).input_ids
    answers = {model: tuple(reference(ids, _adapter(model), MAX_TOKENS)) for model in MODELS}
    assert len(set(answers.values())) == len(MODELS)


@pytest.mark.parametrize("model", ["tiny", "beta"])
def test_chat_uses_the_chat_template_and_equals_offline_generate(client, tokenizer, reference, model) -> None:
    want = reference(_chat_ids(tokenizer, PROMPTS[1]), _adapter(model), MAX_TOKENS)
    got = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=MAX_TOKENS, temperature=0
    )
    assert got.model == model
    assert got.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert got.usage.completion_tokens == len(want)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_the_whole_answer(client, kind) -> None:
    if kind == "chat":
        args = {"model": "gamma", "messages": [{"role": "user", "content": PROMPTS[2]}]}
        whole = client.chat.completions.create(**args, max_tokens=MAX_TOKENS, temperature=0)
        chunks = list(
            client.chat.completions.create(**args, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = whole.choices[0].message.content
    else:
        args = {"model": "alpha", "prompt": PROMPTS[2]}
        whole = client.completions.create(**args, max_tokens=MAX_TOKENS, temperature=0)
        chunks = list(client.completions.create(**args, max_tokens=MAX_TOKENS, temperature=0, stream=True))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        text = whole.choices[0].text
    assert streamed == text
    assert all(c.model == args["model"] for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_a_stream_ends_with_done_and_can_carry_usage(server) -> None:
    body = {
        "model": "beta",
        "prompt": PROMPTS[0],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


def test_concurrent_mixed_requests_each_equal_their_own_reference(server, tokenizer, reference) -> None:
    """Eight requests at once over the base and three adapters (room for two: LRU swaps them in)."""
    jobs = [(model, prompt) for prompt in PROMPTS[:2] for model in MODELS]

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            answers = await asyncio.gather(
                *(
                    aclient.completions.create(
                        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
                    )
                    for model, prompt in jobs
                )
            )
        return [answer.choices[0].text for answer in answers]

    got = asyncio.run(run_all())
    want = [
        tokenizer.decode(
            reference(tokenizer(prompt).input_ids, _adapter(model), MAX_TOKENS), skip_special_tokens=True
        )
        for model, prompt in jobs
    ]
    assert got == want
    assert len(server.engine.bank.loaded_names()) <= 2


def test_same_seed_same_sample_and_stop_strings_cut_the_answer(client) -> None:
    args = {"model": "alpha", "prompt": PROMPTS[3], "max_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    first = client.completions.create(**args, seed=5).choices[0].text
    assert client.completions.create(**args, seed=5).choices[0].text == first
    greedy = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0).choices[
        0
    ]
    stop = greedy.text[3:6]
    cut = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == greedy.text[: greedy.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_unknown_model_is_404_in_openai_error_shape(client, server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert "nope" in caught.value.body["message"]


@pytest.mark.parametrize(
    "extra", [{"n": 2}, {"logprobs": 3}, {"frobnicate": True}, {"max_tokens": 100000}, {"temperature": "hot"}]
)
def test_unsupported_or_bad_fields_are_400(server, extra) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra}
    response = httpx.post(
        f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and next(iter(extra)) in error["message"]


def test_a_body_above_the_limit_is_413_even_without_content_length(server) -> None:
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=headers, timeout=30)
    assert response.status_code == 413 and "above 1048576 bytes" in response.json()["error"]["message"]


def test_a_prompt_above_the_limit_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="tokens, above the limit of 64"):
        client.completions.create(model="tiny", prompt="Alice " * 100, max_tokens=2)  # 600 bytes, > 64 tokens
    with pytest.raises(openai.BadRequestError, match="bytes, above the limit of 1024"):  # 16 bytes per token
        client.completions.create(model="tiny", prompt="Alice " * 200, max_tokens=2)


def test_no_or_wrong_key_is_401_and_health_needs_none(server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_are_prometheus_text(server, client) -> None:
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert httpx.get(f"{server.url}/no/such/path-123").status_code == 404
    text = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="/v1/completions",status="200"' in text and "path-123" not in text
    for name in (
        "peftkit_requests_total",
        "peftkit_completion_tokens_total",
        "peftkit_time_to_first_token_seconds_bucket",
        "peftkit_request_latency_seconds_bucket",
        "peftkit_batch_occupancy_bucket",
        "peftkit_adapters_loaded",
    ):
        assert name in text
