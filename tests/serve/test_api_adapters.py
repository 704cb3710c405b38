"""Adapters at run time through vLLM's endpoints: load, duplicate, unload then 404; every refusal a 4xx
with its reason and nothing left half-registered; slot reuse keeps answers right."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from helpers.serve import API_KEY, PROMPTS

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, headers=HEADERS, timeout=30)


def test_load_answer_duplicate_unload_then_404(server, client, tokenizer, reference) -> None:
    loaded = _post(server, "load_lora_adapter", {"lora_name": "alpha-again", "lora_path": "alpha"})
    assert loaded.status_code == 200, loaded.text
    assert "alpha-again" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="alpha-again", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    want = reference(tokenizer(PROMPTS[1]).input_ids, "alpha", 8)
    assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)

    again = _post(server, "load_lora_adapter", {"lora_name": "alpha-again", "lora_path": "beta"})
    assert again.status_code == 400 and "loaded already" in again.json()["error"]["message"]

    assert _post(server, "unload_lora_adapter", {"lora_name": "alpha-again"}).status_code == 200
    assert "alpha-again" not in server.engine.bank.names() + server.engine.bank.loaded_names()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="alpha-again", prompt=PROMPTS[1], max_tokens=2)
    assert _post(server, "unload_lora_adapter", {"lora_name": "alpha-again"}).status_code == 404


def _escape_link(serve_files: dict[str, Path]) -> str:
    link = serve_files["root"] / "escape-link"
    if not link.exists():
        link.symlink_to(serve_files["base"].parent / "outside", target_is_directory=True)
        (serve_files["base"].parent / "outside").mkdir(exist_ok=True)
    return "escape-link"


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("../base", 403, "outside the adapter root"),
        ("LINK", 403, "outside the adapter root"),
        ("/etc", 403, "outside the adapter root"),
        ("missing", 400, "no such directory"),
        (".", 400, "has no adapter_config.json"),
        ("wrong", 400, "does not fit the served model"),
        ("wide", 400, "rank 16, above"),
    ],
)
def test_refused_paths_and_adapters_leave_nothing_behind(server, serve_files, path, status, reason) -> None:
    if path == "LINK":
        path = _escape_link(serve_files)
    bank = server.engine.bank
    before = bank.names(), bank.resident_names()
    response = _post(server, "load_lora_adapter", {"lora_name": "refused", "lora_path": path})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    assert (bank.names(), bank.resident_names()) == before


def test_pickled_weights_are_never_loaded(server, serve_files) -> None:
    pickled = serve_files["root"] / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text((serve_files["alpha"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    response = _post(server, "load_lora_adapter", {"lora_name": "pickled", "lora_path": "pickled"})
    assert response.status_code == 400 and "pickle files are never loaded" in response.text


def test_lru_reuses_two_slots_for_three_adapters_and_answers_stay_right(
    server, client, tokenizer, reference
) -> None:
    bank = server.engine.bank
    for model in ("alpha", "beta", "gamma", "alpha", "gamma", "beta"):
        got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
        want = reference(tokenizer(PROMPTS[0]).input_ids, model, 6)
        assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
        assert model in bank.loaded_names()
        assert len(bank.loaded_names()) <= 2
    assert set(bank.loaded_names()) == {"gamma", "beta"}  # alpha was the least recently used
