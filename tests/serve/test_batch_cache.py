"""The batched KV cache: rows joining (left padding) and leaving, and the mask that keeps rows apart.
A batched decoding step over joined rows must give each row what it gets alone."""

from __future__ import annotations

import torch

from peftkit.serve.batch_cache import attention_mask, check_supported, drop_rows, join_row

from helpers.tiny_lm import build_model


def test_attention_mask_marks_each_rows_last_positions() -> None:
    mask = attention_mask([2, 4, 1], 4, torch.device("cpu"))
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]


def _prefill(model, ids: list[int]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tensor = torch.tensor([ids])
    out = model(input_ids=tensor, past_key_values=cache, use_cache=True)
    return out.past_key_values, out.logits[0, -1]


def test_joined_rows_decode_as_they_would_alone_and_dropping_trims_padding() -> None:
    model = build_model(vocab_size=50).eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    with torch.no_grad():
        batch = None
        for ids in prompts:
            cache, _ = _prefill(model, ids)
            check_supported(cache)
            batch = join_row(batch, cache)
        assert batch.layers[0].keys.shape[:3] == (3, 2, 5)  # (rows, kv heads, longest prompt)
        nxt = [20, 21, 22]
        lengths = [len(p) for p in prompts]
        out = model(
            input_ids=torch.tensor(nxt)[:, None],
            attention_mask=attention_mask([n + 1 for n in lengths], 6, torch.device("cpu")),
            position_ids=torch.tensor(lengths)[:, None],
            past_key_values=batch,
            use_cache=True,
        )
        for row, ids in enumerate(prompts):
            _, alone = _prefill(model, [*ids, nxt[row]])
            torch.testing.assert_close(out.logits[row, -1], alone, atol=1e-5, rtol=1e-5)
        kept = drop_rows(batch, [2, 1], longest=4)  # the longest row leaves: its padding columns go
        assert kept.layers[0].keys.shape[:3] == (2, 2, 4)
        own_keys = _prefill(model, [*prompts[2], nxt[2]])[0].layers[0].keys[0]  # (kv heads, 4, head_dim)
        torch.testing.assert_close(kept.layers[0].keys[0], own_keys, atol=1e-5, rtol=1e-5)
    assert drop_rows(batch, [], 0) is None
