"""The adapter bank: slots reused least-recently-used first, a CPU tier that keeps evicted adapters (no
second read), reloads that run the registration's checks, leases released once, reservations."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from peftkit.serve.adapter_files import AdapterError

from helpers.serve import PROMPTS, ask, engine_for

ROTATION = ("alpha", "beta", "gamma", "delta")


def _answer(engine, tokenizer, adapter: str, prompt: str = PROMPTS[0], max_tokens: int = 6):
    _, collected = ask(engine, tokenizer(prompt).input_ids, adapter, max_tokens=max_tokens)
    assert collected.done.wait(60)
    return collected


def _want(tokenizer, reference, adapter: str, prompt: str = PROMPTS[0], max_tokens: int = 6) -> str:
    return tokenizer.decode(
        reference(tokenizer(prompt).input_ids, adapter, max_tokens), skip_special_tokens=True
    )


def test_two_slots_and_four_adapters_in_rotation_read_each_file_once(
    serve_files, tokenizer, reference, monkeypatch
) -> None:
    from peftkit.serve import bank as bank_module

    reads: Counter[Path] = Counter()
    real = bank_module.read_adapter_files
    monkeypatch.setattr(bank_module, "read_adapter_files", lambda d, root: reads.update([d]) or real(d, root))
    engine = engine_for(serve_files, adapters=ROTATION, max_adapters=2)
    engine.start()
    try:
        for adapter in ROTATION * 3:
            collected = _answer(engine, tokenizer, adapter)
            assert collected.text == _want(tokenizer, reference, adapter), adapter
            assert len(engine.bank.loaded_names()) <= 2
    finally:
        engine.stop()
    assert sorted(reads.values()) == [1, 1, 1, 1] and len(reads) == 4  # registration only
    assert engine.metrics.adapter_placements._value.get() == 12  # every request placed its adapter again
    assert engine.metrics.adapter_evictions.labels("slot")._value.get() == 10


def test_the_cpu_tier_bounds_the_slots_so_no_more_adapters_stay_in_memory_than_it_says(
    serve_files, tokenizer, reference
) -> None:
    engine = engine_for(serve_files, adapters=ROTATION, max_cpu_adapters=2)  # slots unbounded otherwise
    engine.start()
    try:
        for adapter in ROTATION * 2:
            collected = _answer(engine, tokenizer, adapter)
            assert collected.text == _want(tokenizer, reference, adapter), adapter
            assert len(engine.bank.resident_names()) <= 2 and engine.bank.slots.count <= 2
    finally:
        engine.stop()


def test_a_cpu_tier_smaller_than_the_slots_is_refused(serve_files) -> None:
    with pytest.raises(ValueError, match="max_resident 1 is below max_slots 2"):
        engine_for(serve_files, adapters=(), max_adapters=2, max_cpu_adapters=1)


def _copy_root(serve_files, tmp_path: Path, names: tuple[str, ...]) -> Path:
    root = tmp_path / "root"
    for name in names:
        shutil.copytree(serve_files[name], root / name)
    return root


def _evicted_engine(serve_files, tmp_path: Path):
    """One slot, one adapter in the CPU tier: ``alpha`` and ``beta`` registered at run time from a root of
    copies; after answering alpha then beta, alpha is out of both tiers (its next use reads it again)."""
    root = _copy_root(serve_files, tmp_path, ("alpha", "beta"))
    engine = engine_for(
        serve_files, adapters=(), max_adapters=1, max_cpu_adapters=1, max_rank=8, adapter_root=str(root)
    )
    for name in ("alpha", "beta"):
        engine.bank.register(name, name)
    return engine, root


@pytest.mark.parametrize(
    "damage", ["symlink out of the root", "rank 16 copied over", "truncated", "r: eight"]
)
def test_a_reload_runs_the_registrations_checks_and_the_engine_keeps_serving(
    serve_files, tokenizer, reference, tmp_path, damage
) -> None:
    engine, root = _evicted_engine(serve_files, tmp_path)
    engine.start()
    try:
        assert _answer(engine, tokenizer, "alpha").text == _want(tokenizer, reference, "alpha")
        assert _answer(engine, tokenizer, "beta").text == _want(tokenizer, reference, "beta")
        assert engine.bank.resident_names() == ["beta"]  # alpha left both tiers
        weights = root / "alpha" / "adapter_model.safetensors"
        if damage == "symlink out of the root":
            weights.unlink()
            weights.symlink_to(serve_files["gamma"] / "adapter_model.safetensors")
        elif damage == "rank 16 copied over":
            shutil.rmtree(root / "alpha")
            shutil.copytree(serve_files["wide"], root / "alpha")
        elif damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:500])
        else:
            config = root / "alpha" / "adapter_config.json"
            config.write_text(config.read_text().replace('"r": 8', '"r": "eight"'))
        refused = _answer(engine, tokenizer, "alpha")
        assert refused.final.status == 400 and "no longer loads" in refused.final.error
        again = _answer(engine, tokenizer, "alpha")  # told at once, not read again and again
        assert again.final.status == 400
        assert _answer(engine, tokenizer, "beta", PROMPTS[1]).text == _want(
            tokenizer, reference, "beta", PROMPTS[1]
        )
    finally:
        engine.stop()
    expected = {
        "symlink out of the root": "links outside the adapter root",
        "rank 16 copied over": "rank 16, above",
        "truncated": "not a complete safetensors file",
        "r: eight": "r and rank_pattern values must be positive integers",
    }[damage]
    assert expected in refused.final.error


def test_a_lease_released_twice_counts_once_and_the_adapter_unloads(serve_files) -> None:
    engine = engine_for(serve_files, adapters=("alpha",))
    bank = engine.bank
    lease = bank.lease("alpha")
    with pytest.raises(AdapterError, match="in use by 1") as caught:
        bank.unregister("alpha")
    assert caught.value.status == 409
    lease.release()
    lease.release()
    assert bank._users[lease.slot] == 0
    bank.unregister("alpha")
    assert bank.names() == []


def test_a_request_waiting_for_a_busy_slot_reserves_it(serve_files) -> None:
    """One slot held by alpha's running request: beta reserves it, later alpha requests wait behind beta
    (no starvation), and beta gets the slot once alpha's request ends."""
    engine = engine_for(serve_files, adapters=("alpha", "beta"), max_adapters=1)
    bank = engine.bank
    running = bank.lease("alpha")
    assert bank.lease("beta") is None  # reserves the busy slot
    assert bank.lease("alpha") is None  # the slot drains for beta
    running.release()
    got = bank.lease("beta")
    assert got is not None and bank.loaded_names() == ["beta"]
    got.release()
    assert bank.lease("alpha") is not None  # the reservation is gone with its placement


def test_registration_keeps_nothing_when_refused_and_never_needs_a_free_slot(serve_files) -> None:
    engine = engine_for(serve_files, adapters=("alpha",), max_adapters=1)
    bank = engine.bank
    held = bank.lease("alpha")
    bank.register("beta", "beta")  # the one slot is busy: registration only reads and checks
    assert bank.names() == ["alpha", "beta"] and bank.loaded_names() == ["alpha"]
    with pytest.raises(AdapterError, match="rank 16, above") as caught:
        engine.bank.max_rank = 8
        bank.register("wide", "wide")
    assert caught.value.status == 400 and bank.names() == ["alpha", "beta"]
    held.release()


def test_runtime_loading_is_off_without_an_adapter_root(serve_files) -> None:
    engine = engine_for(serve_files, adapters=(), adapter_root=None)
    with pytest.raises(AdapterError, match="--adapter-root") as caught:
        engine.bank.register("alpha", serve_files["alpha"])
    assert caught.value.status == 403
