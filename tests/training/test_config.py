"""Typed run configs: every shipped config loads, no two write to the same folder, and mistakes are errors that
name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, Stage1Config, Stage2Config, config_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(ROOT / "training" / "configs").rglob("*.yaml"), *(ROOT / "research" / "configs").rglob("*.yaml")])


def config_class(path: Path):
    """Stage-1 objectives: stage 1 itself and retrieval fine-tuning; everything else is stage 2."""
    return Stage1Config if ("stage1" in path.name or "retrieval" in path.name) else Stage2Config


def test_there_are_shipped_configs():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert "training/configs/default/stage1.yaml" in names and "training/configs/stage2_tiny.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_loads(path):
    config = load_config(path, [], config_class(path))
    assert config.output_dir.startswith("runs/")  # outputs never land in the source tree or assets/
    # Evaluation-only data never trains: the sample photos, and the test split of a held-out-by-concept source.
    for source in config.data.sources:
        assert source["type"] != "photos"
        assert source.get("split", "train") == "train" or source["type"] not in ("emoji", "tuxpaint", "easyvqa")


def test_no_two_shipped_configs_write_to_the_same_folder():
    owners: dict[str, list[str]] = {}
    for path in SHIPPED:
        owners.setdefault(load_config(path, [], config_class(path)).output_dir, []).append(path.name)
    assert {d: names for d, names in owners.items() if len(names) > 1} == {}


def test_a_recipe_step_is_its_base_plus_the_few_keys_it_sets():
    base = config_dict(load_config(ROOT / "training/configs/default/vqa.yaml", [], Stage2Config))
    step = config_dict(load_config(ROOT / "training/configs/default/vqa_open.yaml", [], Stage2Config))
    changed = {section: {k: v for k, v in value.items() if base[section][k] != v} if isinstance(value, dict)
               and section not in ("encoder", "prompt") else value
               for section, value in step.items() if base[section] != value}
    assert changed == {
        "output_dir": "runs/default/vqa_open", "init_from": "runs/default/vqa/checkpoint",
        "data": {"repeat_questions": {"^what ": 4}},  # a rule set replaces the base's whole, it is not merged
        "optim": {"lr": 1e-4, "warmup_steps": 10}, "train": {"steps": 250},
    }
    # Inherited from stage2.yaml through vqa.yaml, untouched:
    assert step["llm_dtype"] == "float32" and step["data"]["cache_dir"] == "runs/features"


def test_unknown_keys_are_errors_wherever_they_are(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stpes: 3}\n")
    with pytest.raises(ConfigError, match="'train.stpes'"):
        load_config(bad, [], Stage1Config)
    with pytest.raises(ConfigError, match="'llm'"):
        load_config(None, ["llm=x"], Stage1Config)  # a stage-2 key in a stage-1 run
    with pytest.raises(ConfigError, match="'data.sources.n'.*not a config section"):
        load_config(None, ["data.sources.n=3"], Stage2Config)  # a list of specs is one value
    with pytest.raises(ConfigError, match="'encoder.variant'"):  # as is an encoder spec: never half-replaced
        load_config(None, ["encoder.variant=lite1"], Stage2Config)


def test_values_are_checked_against_the_field_types(tmp_path):
    assert load_config(None, ["optim.lr=1e-3", "train.steps=7"], Stage2Config).optim.lr == 1e-3
    for override, message in [("train.steps=1.5", "train.steps must be an integer"),
                              ("data.balance_yes_no=maybe", "data.balance_yes_no must be true or false"),
                              ("task=translate", "task must be one of pretrain, caption, vqa"),
                              ("data.repeat_questions={a: x}", r"data.repeat_questions\['a'\] must be an integer"),
                              ("optim=3", "optim is a section"),
                              ("data.sources=scenes", "data.sources must be a list")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override], Stage2Config)
    assert load_config(None, ["init_from=null"], Stage2Config).init_from is None


def test_extends_chains_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("output_dir: runs/base\ntrain: {steps: 5, batch_size: 4}\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\ntrain: {steps: 6}\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\noutput_dir: runs/top\n")
    config = load_config(tmp_path / "top.yaml", ["train.seed=3"], Stage1Config)
    assert (config.output_dir, config.train.steps, config.train.batch_size, config.train.seed) == ("runs/top", 6, 4, 3)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml", [], Stage1Config)
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "lost.yaml", [], Stage1Config)


def test_a_run_config_written_out_loads_back_the_same(tmp_path):
    from training.config import dump_config

    config = load_config(ROOT / "training/configs/default/yes_no.yaml", [], Stage2Config)
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", [], Stage2Config) == config
