"""peftkit.compare.plan: presets, method mappings, the rank sweep, fingerprints, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.compare.plan import GENERAL_TEXT, PRESETS, fingerprint, load_plan, make_plan
from peftkit.foundation.errors import UsageError

LAYERS = 30  # SmolLM2-135M's decoder layer count, given so that no model config is read


def plan_of(**data):
    return make_plan({"output_dir": "out/c", **data}, num_layers=LAYERS)


def test_presets_become_train_configs_under_the_report_directory() -> None:
    plan = plan_of(methods=["full", "lora", "prompt"], max_steps=7)
    assert [run.name for run in plan.runs] == ["full", "lora", "prompt"]
    full, lora, prompt = plan.runs
    assert full.config.method == "full" and full.config.lr == PRESETS["full"]["lr"]
    # target_modules unset: the model's attention projections (methods/default_targets.py)
    assert lora.config.method_options == {"r": 8, "lora_alpha": 16}
    assert prompt.config.method == "prompt" and prompt.config.lr == PRESETS["prompt"]["lr"]
    assert all(run.config.max_steps == 7 for run in plan.runs)  # shared settings reach every method
    assert lora.config.output_dir == str(Path("out/c/runs/lora"))
    assert plan.general_text == GENERAL_TEXT and plan.sweep == ()
    assert plan.shared.output_dir == "out/c" and plan.output_dir == Path("out/c")


def test_a_mapping_starts_from_a_preset_and_takes_flat_or_nested_options() -> None:
    plan = plan_of(
        methods=[
            {"name": "lora-qv", "preset": "lora", "target_modules": ["q_proj", "v_proj"], "lr": 5e-4},
            {"name": "ia3-custom", "method": "ia3", "method_options": {"target_modules": ["v_proj"]}},
        ]
    )
    qv, ia3 = plan.runs
    assert qv.config.method_options == {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert qv.config.lr == 5e-4
    assert ia3.config.method == "ia3" and ia3.config.method_options == {"target_modules": ["v_proj"]}


def test_last_n_layers_selects_the_last_blocks_of_the_model() -> None:
    (run,) = plan_of(methods=["last-3-layers"]).runs
    assert run.config.method == "selective"
    assert run.config.method_options["layers_to_transform"] == [LAYERS - 3, LAYERS - 2, LAYERS - 1]
    with pytest.raises(UsageError, match="has 30 layers"):
        plan_of(methods=["last-31-layers"])


def test_rank_sweep_reuses_an_equal_listed_method_and_keeps_alpha_over_r() -> None:
    plan = plan_of(methods=["full", {"name": "lora", "preset": "lora", "lora_alpha": 16}], ranks="2,8,32")
    names = [run.name for run in plan.runs]
    assert names == ["full", "lora", "lora-r2", "lora-r32"]  # r=8, alpha=16 is the listed "lora"
    assert plan.sweep == ("lora-r2", "lora", "lora-r32")
    for name in plan.sweep:
        options = plan.run(name).config.method_options
        assert options["lora_alpha"] == 2 * options["r"]
        assert "target_modules" not in options  # the model's attention projections
    assert [plan.run(name).rank for name in plan.sweep] == [2, 8, 32]


def test_rank_sweep_of_its_own_method() -> None:
    plan = plan_of(methods=["full"], ranks=[4, 1], rank_sweep={"preset": "lora-all-linear"})
    assert plan.sweep == ("lora-all-linear-r1", "lora-all-linear-r4")
    assert plan.run("lora-all-linear-r4").config.method_options["target_modules"] == "all-linear"
    with pytest.raises(UsageError, match="LoRA or DoRA"):
        plan_of(methods=["full"], ranks=[4], rank_sweep="prompt")


def test_fingerprint_follows_what_decides_the_result() -> None:
    one, other = plan_of(methods=["lora"]).runs[0], plan_of(methods=["lora"], lr=0.5).runs[0]
    moved = plan_of(methods=["lora"], output_dir="elsewhere", threads=1).runs[0]
    # the preset's lr wins over the shared one, so a shared lr does not change this method
    assert one.fingerprint == other.fingerprint == moved.fingerprint
    assert fingerprint(one.config) != fingerprint(one.config.replace(max_steps=3))
    assert fingerprint(one.config) != fingerprint(one.config.replace(method_options={"r": 4}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"methods": ["loar"]}, "unknown method preset 'loar'.*did you mean 'lora'"),
        ({"methods": ["lora", "lora"]}, "appears twice"),
        ({"methods": ["lora"], "method": "lora"}, "lists its methods under 'methods:'"),
        ({"methods": ["lora"], "max_step": 3}, "unknown key 'max_step'.*did you mean 'max_steps'"),
        (
            {"methods": [{"name": "x", "preset": "lora", "rank": 4}]},
            "unknown key 'rank'.*lora.*did you mean 'r'",
        ),
        ({"methods": ["lora"], "learning_rate": 1e-3}, "unknown key 'learning_rate'.*did you mean 'lr'"),
        ({"methods": [{"name": "a b", "preset": "lora"}]}, "letters, digits"),
        ({"methods": [{"name": "x", "preset": "lora", "output_dir": "y"}]}, "compare decides it"),
        ({"methods": ["lora"], "ranks": "2,x"}, "whole numbers"),
        ({"methods": ["lora"], "ranks": [0, 2]}, "positive"),
        ({"methods": ["lora"], "general_text": "/no/such/file.txt"}, "general_text"),
        ({"methods": []}, "non-empty list"),
    ],
)
def test_bad_input_names_what_is_wrong(data: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_of(**data)


def test_load_plan_reads_yaml_and_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "compare.yaml"
    path.write_text("methods: [full, lora]\nmax_steps: 5\noutput_dir: " + str(tmp_path / "r") + "\n")
    plan = load_plan(path, {"methods": "lora,prompt", "max_steps": 9}, num_layers=LAYERS)
    assert [run.name for run in plan.runs] == ["lora", "prompt"]
    assert plan.runs[0].config.max_steps == 9 and plan.output_dir == tmp_path / "r"
    with pytest.raises(UsageError, match="not found"):
        load_plan(tmp_path / "missing.yaml")
