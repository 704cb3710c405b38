"""Fixtures for the server tests (a plugin of the root conftest, ``pytest_plugins``): a tiny Llama with its
tokenizer, adapters that change its outputs, and offline reference answers from ``PeftModel.generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_lm import build_model, build_tokenizer, save_tiny_lm

ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = ("Alice is 30 years old", "Bob lives in Paris", "The name is Carol", "Dan")


def _save_sensitive_tiny_lm(directory: Path, weight_scale: float = 6.0) -> Path:
    """tiny_lm's model with its matrices scaled up: at the default init (std 0.02) its greedy answer
    hardly depends on more than the last token, so wrong positions or a wrong mask would go unseen."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(weight_scale)
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _save_adapter(base_dir: Path, out: Path, seed: int, r: int = 8) -> Path:
    from peftkit import LoraConfig, wrap
    from peftkit.foundation.loading import load_model

    base, _ = load_model(str(base_dir))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    wrap(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def serve_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base``: a tiny model dir; ``root/<name>``: adapters (alpha, beta, gamma, delta r=8, ``wide``
    r=16); ``wrong``: an adapter for a wider model (under the root too)."""
    top = tmp_path_factory.mktemp("serve")
    base = _save_sensitive_tiny_lm(top / "base")
    root = top / "root"
    files = {"base": base, "root": root}
    for seed, name in enumerate(ADAPTERS, start=1):
        files[name] = _save_adapter(base, root / name, seed)
    files["delta"] = _save_adapter(base, root / "delta", 4)
    files["wide"] = _save_adapter(base, root / "wide", 7, r=16)
    other = save_tiny_lm(top / "other", hidden=64)
    files["wrong"] = _save_adapter(other, root / "wrong", 9)
    return files


@pytest.fixture(scope="session")
def reference(serve_files: dict[str, Path]):
    """``reference(prompt_ids, adapter or None, max_new_tokens)``: the offline greedy answer's token ids."""
    from peftkit import PeftModel
    from peftkit.foundation.loading import load_model

    base, tokenizer = load_model(str(serve_files["base"]))
    model = PeftModel(base)
    for name in (*ADAPTERS, "delta"):
        model.load_adapter(serve_files[name], adapter_name=name)
    eos = tokenizer.eos_token_id

    def answer(prompt_ids: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=[adapter or "__base__"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        new = out[0, len(prompt_ids) :].tolist()
        return new[: new.index(eos) + 1] if eos in new else new

    return answer


API_KEY = "test-key"


@pytest.fixture(scope="session")
def server(serve_files: dict[str, Path]):
    """A server on a free loopback port: the tiny base as ``tiny``, alpha/beta/gamma with room for two
    (LRU), runtime loading from the root, ranks up to 8, an API key; stopped after the session."""
    from peftkit.serve.limits import ServeLimits
    from peftkit.serve.server import ServeSettings, ThreadedServer, build_app

    settings = ServeSettings(
        model=str(serve_files["base"]),
        adapters={name: str(serve_files[name]) for name in ADAPTERS},
        adapter_root=str(serve_files["root"]),
        max_adapters=2,
        max_rank=8,
        max_concurrent=4,
        limits=ServeLimits(api_key=API_KEY, max_new_tokens=200, max_prompt_tokens=64),
    )
    app, engine = build_app(settings, base_name="tiny")
    with ThreadedServer(app) as running:
        running.engine = engine
        yield running


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tokenizer(serve_files: dict[str, Path]):
    from peftkit.foundation.loading import load_model

    return load_model(str(serve_files["base"]))[1]


def engine_for(serve_files: dict[str, Path], adapters: tuple[str, ...] = ADAPTERS, **settings):
    """An unstarted engine over the tiny base (``tiny``) with ``adapters`` registered from the root."""
    from peftkit.serve.server import ServeSettings, build_app

    settings.setdefault("adapter_root", str(serve_files["root"]))
    chosen = {name: str(serve_files[name]) for name in adapters}
    _, engine = build_app(
        ServeSettings(model=str(serve_files["base"]), adapters=chosen, **settings), base_name="tiny"
    )
    return engine


class Collected:
    """What one request submitted straight to an engine was told: ``text`` and its final event."""

    def __init__(self) -> None:
        import threading

        self.pieces: list[str] = []
        self.final = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.pieces.append(event.text)
        if event.final:
            self.final = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def ask(engine, prompt_ids: list[int], adapter: str | None, max_tokens: int = 8, **params):
    """Submit a greedy (unless ``params`` say otherwise) request to ``engine``; (request, Collected)."""
    from peftkit.serve.rows import GenerationRequest
    from peftkit.serve.sampling import SamplingParams

    collected = Collected()
    params.setdefault("temperature", 0.0)
    request = GenerationRequest(
        prompt_ids, adapter, SamplingParams(max_tokens=max_tokens, **params), collected
    )
    engine.submit(request)
    return request, collected


def small_server(serve_files: dict[str, Path], adapters: tuple[str, ...] = (), **settings):
    """An unstarted server of its own (``with small_server(...) as server``) over the tiny base (``tiny``),
    ``adapters`` registered at start-up; no API key unless ``limits`` says so."""
    from peftkit.serve.server import ServeSettings, ThreadedServer, build_app

    chosen = {name: str(serve_files[name]) for name in adapters}
    settings = ServeSettings(model=str(serve_files["base"]), adapters=chosen, **settings)
    app, _ = build_app(settings, base_name="tiny")
    return ThreadedServer(app)
