"""The shipped accelerate configs, and stage 2 under FSDP2 on 2 CPU processes (gloo): the same losses as 1 process
with the same global batch, sharded training checkpoints that resume exactly after kill -9, and an export that
blip2 loads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from conftest import build_tiny_text_llm
from test_stage1_run import kill_after_checkpoint
from test_stage2 import env, losses, stage1_tiny, train  # noqa: F401  (stage1_tiny is a fixture)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "training" / "accelerate"


def test_shipped_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {path.stem: load_config_from_file(str(path)) for path in sorted(CONFIGS.glob("*.yaml"))}
    assert set(kinds) == {"ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"}
    assert kinds["ddp"].distributed_type == "MULTI_GPU"
    assert kinds["fsdp2"].distributed_type == "FSDP" and kinds["fsdp2"].fsdp_config["fsdp_version"] == 2
    for stage in (2, 3):
        config = kinds[f"deepspeed_zero{stage}"]
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == stage
    # ZeRO-3 can only export full weights if it gathers them at save time.
    assert kinds["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True


def fsdp_command(*args, processes=2):
    # --mixed_precision no: the shipped config trains in bf16 on GPUs; fp32 here so 1 and 2 processes compare tightly.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml"),
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "-m", "training",
            *args]


def cpu_env():
    return {**env(), "ACCELERATE_USE_CPU": "true"}


def launch(cmd):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sharded_llm_weights(stdout: str) -> tuple[int, int]:
    match = re.search(r"frozen LLM sharded over 2 processes: ([\d,]+) of ([\d,]+) weights", stdout)
    assert match, stdout[-2000:]
    held, total = (int(n.replace(",", "")) for n in match.groups())
    return held, total


def assert_half_held(llm, held: int, total: int) -> None:
    """Each of 2 processes holds half of every LLM weight except the word embeddings (whole on every process: most
    LLMs tie them to the LM head, and stage 2 looks words up outside the LLM's forward)."""
    config = AutoConfig.from_pretrained(llm)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    reference = cls.from_pretrained(llm)
    assert total == sum(p.numel() for p in reference.parameters())
    words = {p for m in (reference.get_input_embeddings(), reference.get_output_embeddings()) for p in m.parameters()}
    whole = sum(p.numel() for p in words)
    assert held == pytest.approx(whole + (total - whole) / 2, abs=64)  # row padding of odd-sized shards


@pytest.mark.slow
def test_fsdp_two_processes_match_one_resume_after_kill_and_export(stage1_tiny, tmp_path):
    import blip2
    from safetensors.torch import load_file

    from training.data import Scenes

    stage1, cache = stage1_tiny
    llm = build_tiny_text_llm(tmp_path / "llm", "chat")
    common = ["stage2", "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}", f"llm={llm}",
              f"data.cache_dir={cache}", "train.steps=6", "train.log_every=1", "train.save_every=2", "optim.lr=3e-3",
              "qformer.dropout=0.0", "export.dtype=float32"]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    train(*common, f"output_dir={one}")
    result = launch(fsdp_command(*common, f"output_dir={two}", "train.batch_size=4"))  # the same global batch of 8

    # The frozen LLM is sharded too: each process holds half of every weight except the word embeddings (whole on
    # every process: tied to the LM head and looked up outside the model's forward).
    held, total = sharded_llm_weights(result.stdout)
    assert_half_held(llm, held, total)

    # FSDP really ran (not DDP): the training checkpoint holds one shard of weights and of AdamW state per process.
    step = two / "checkpoints" / "step_00000006"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Measured: equal in all 6 significant digits metrics.csv keeps. The two runs sum the same float32 gradients in
    # another order (a reduce-scatter of two half-batch means vs one full-batch sum), ~1e-7 relative per step;
    # rel 1e-5 leaves room for a last-digit rounding flip, and is far below a wrong batch split (~1e-2).
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # The export is gathered from the shards: the full weights, as one process trains them (measured max abs
    # difference 1e-5 after 6 AdamW steps at lr 3e-3).
    weights_one = load_file(one / "checkpoint" / "trained.safetensors")
    weights_two = load_file(two / "checkpoint" / "trained.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for key, value in weights_one.items():
        assert weights_two[key].shape == value.shape
        assert torch.allclose(weights_two[key], value, atol=1e-4), key
    model = blip2.load(str(two / "checkpoint"), precision="fp32", device="cpu")
    assert not model.info.untrained and model.num_query_tokens == 8
    assert isinstance(model.ask(Scenes(1, seed=5)[0]["image"], "How many shapes are there?", max_new_tokens=4), str)

    # kill -9 both processes (and the launcher) right after the step-2 checkpoint, then resume on 2 processes.
    kill_after_checkpoint(fsdp_command(*common, f"output_dir={killed}", "train.batch_size=4"), killed, step=2,
                          environment=cpu_env())
    launch(fsdp_command(*common, f"output_dir={killed}", "train.batch_size=4", "--resume"))
    assert losses(killed) == pytest.approx(losses(two), rel=1e-6)  # the same processes: the same sums
    resumed = load_file(killed / "checkpoint" / "trained.safetensors")
    assert all(torch.allclose(resumed[k], weights_two[k], atol=1e-6) for k in weights_two)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_fsdp_shards_the_frozen_llm_of_each_family(kind, stage1_tiny, tmp_path):
    """OPT (decoder-only, learned positions) and Flan-T5 (encoder-decoder, prefix LM, an untied LM head): the LLM
    sharded over 2 processes gives the losses of 1 process."""
    stage1, cache = stage1_tiny
    llm = build_tiny_text_llm(tmp_path / "llm", kind)
    common = ["stage2", "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}", f"llm={llm}",
              f"data.cache_dir={cache}", "train.steps=3", "train.log_every=1", "train.save_every=3", "optim.lr=3e-3",
              "qformer.dropout=0.0"]
    train(*common, f"output_dir={tmp_path / 'one'}")
    result = launch(fsdp_command(*common, f"output_dir={tmp_path / 'two'}", "train.batch_size=4"))
    assert_half_held(llm, *sharded_llm_weights(result.stdout))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
def test_processes_without_a_process_group_are_refused(tmp_path):
    """Launched on CPU without ACCELERATE_USE_CPU, accelerate leaves each process alone: N copies of the same run
    would write one folder. The run says so instead."""
    result = subprocess.run(fsdp_command("stage2", "--config", "training/configs/stage2_tiny.yaml",
                                         f"output_dir={tmp_path}"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode != 0 and "ACCELERATE_USE_CPU=true" in result.stderr
