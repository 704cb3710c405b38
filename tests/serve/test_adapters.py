"""Adapters at run time through vLLM's endpoints: load, duplicate, unload then 404; every refusal a 4xx
with its reason and nothing left half-loaded; LRU eviction keeps answers right."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from peftkit.serve.adapters import AdapterError, adapter_rank, resolve_inside

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
    assert "alpha-again" not in server.engine.model.peft_config
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
    before = set(server.engine.model.peft_config), set(server.engine.registry.records)
    response = _post(server, "load_lora_adapter", {"lora_name": "refused", "lora_path": path})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]
    assert (set(server.engine.model.peft_config), set(server.engine.registry.records)) == before


def test_a_symlinked_weights_file_out_of_the_root_is_refused(tmp_path: Path, serve_files) -> None:
    root = tmp_path / "root"
    (root / "sneaky").mkdir(parents=True)
    (root / "sneaky" / "adapter_config.json").write_text("{}")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(
        serve_files["alpha"] / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterError, match="links outside the adapter root") as caught:
        resolve_inside(root, "sneaky")
    assert caught.value.status == 403


def test_pickled_weights_are_never_loaded(server, serve_files) -> None:
    pickled = serve_files["root"] / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text((serve_files["alpha"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    response = _post(server, "load_lora_adapter", {"lora_name": "pickled", "lora_path": "pickled"})
    assert response.status_code == 400 and "pickle files are never loaded" in response.text


def test_runtime_loading_is_off_without_an_adapter_root(serve_files) -> None:
    from peftkit.serve.adapters import AdapterRegistry

    registry = AdapterRegistry(model=None, base_name="tiny")
    with pytest.raises(AdapterError, match="--adapter-root") as caught:
        registry.register("alpha", serve_files["alpha"])
    assert caught.value.status == 403


def test_rank_is_the_largest_of_r_and_the_rank_pattern() -> None:
    assert adapter_rank({"r": 8, "rank_pattern": {"q_proj": 32}}) == 32
    assert adapter_rank({"r": 4}) == 4


def test_lru_keeps_two_of_three_loaded_and_answers_stay_right(server, client, tokenizer, reference) -> None:
    registry = server.engine.registry
    for model in ("alpha", "beta", "gamma", "alpha", "gamma", "beta"):
        got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
        want = reference(tokenizer(PROMPTS[0]).input_ids, model, 6)
        assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
        assert model in registry.loaded_names()
        assert len(registry.loaded_names()) <= 2
    assert set(registry.loaded_names()) == {"gamma", "beta"}  # alpha was the least recently used


def test_busy_adapters_are_neither_unloaded_nor_evicted(serve_files) -> None:
    from peftkit import PeftModel
    from peftkit.foundation.loading import load_model
    from peftkit.serve.adapters import AdapterRegistry

    model = PeftModel(load_model(str(serve_files["base"]))[0])
    registry = AdapterRegistry(model, "tiny", max_loaded=1, root=serve_files["root"])
    registry.register("alpha", "alpha")
    assert registry.acquire("alpha")  # a running request uses it
    with pytest.raises(AdapterError, match="in use") as caught:
        registry.unregister("alpha")
    assert caught.value.status == 409
    with pytest.raises(AdapterError, match="in use by running requests") as caught:
        registry.register("beta", "beta")  # the one slot is busy
    assert caught.value.status == 503
    assert "beta" not in registry.records and set(model.peft_config) == {"alpha"}
    registry.release("alpha")
    registry.register("beta", "beta")  # now alpha, idle, is evicted but stays registered
    assert set(model.peft_config) == {"beta"} and not registry.records["alpha"].loaded
    assert registry.acquire("alpha") and set(model.peft_config) == {"alpha"}  # loaded again on demand
