"""The stage-1 training program end to end on the tiny config: 1 process, 2 processes (DDP on CPU via
`accelerate launch`), and an exact resume after kill -9."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.stage1_checkpoint import load_stage1

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "training/configs/stage1_tiny.yaml"
LOSSES = ("loss", "itc", "itm", "itg")

pytestmark = pytest.mark.slow


def command(output_dir, *extra, processes=1):
    if processes == 1:
        head = [sys.executable, "-m", "training"]
    else:
        # DDP on CPU. `accelerate launch --cpu` alone starts N processes only through MPI (mpirun); the torchrun
        # launcher behind --multi_gpu plus ACCELERATE_USE_CPU gives gloo process groups without it.
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training"]
    return [*head, "stage1", "--config", CONFIG, f"output_dir={output_dir}", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "true"}


def run(cmd):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_after_checkpoint(cmd, output_dir, step: int, environment: dict | None = None) -> None:
    """Start a training command and kill -9 it, with every process it launched, as soon as its step-``step``
    checkpoint is the latest; fails if that checkpoint never came."""
    name = f"step_{step:08d}"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment or env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = Path(output_dir) / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            latest.exists() and latest.read_text().strip() == name):
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended by itself: the assertion below says whether the checkpoint came
        pass
    proc.wait()
    assert latest.exists() and latest.read_text().strip() == name


def metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_curve(a, b, rel=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in LOSSES:
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=rel, abs=1e-6), (ra["step"], key)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("one")
    run(command(out, f"data.cache_dir={cache}"))
    return out


def test_single_process_run_writes_everything(reference):
    rows = metrics(reference)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert float(rows[-1]["itg"]) < float(rows[0]["itg"])  # it learns
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    model, config = load_stage1(reference / "stage1")
    assert config["metadata"]["step"] == 12 and model.num_query_tokens == 8
    assert (reference / "stage1" / "tokenizer" / "tokenizer.json").exists()
    assert sorted(p.name for p in (reference / "checkpoints").glob("step_*")) == ["step_00000008", "step_00000012"]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))  # curves for TensorBoard too


def test_two_processes_match_one(tmp_path, cache, reference):
    out = tmp_path / "two"
    run(command(out, f"data.cache_dir={cache}", "train.batch_size=4", processes=2))  # same global batch of 8
    assert_same_curve(metrics(out), metrics(reference))


def test_resume_after_kill_9_continues_the_same_curve(tmp_path, cache, reference):
    out = tmp_path / "killed"
    kill_after_checkpoint(command(out, f"data.cache_dir={cache}"), out, step=4)
    run(command(out, f"data.cache_dir={cache}", "--resume"))
    assert_same_curve(metrics(out), metrics(reference), rel=1e-6)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = subprocess.run(command(tmp_path, "optim.learning_rate=1"), cwd=ROOT, capture_output=True, text=True,
                            env=env(), timeout=120)
    assert result.returncode == 2 and "Unknown config key 'optim.learning_rate'" in result.stderr


def test_eval_retrieval_writes_json(reference, tmp_path):
    import json

    result = run([sys.executable, "-m", "training", "eval-retrieval", "--checkpoint", str(reference / "stage1"),
                  "--data", "scenes:12:99", "--k", "4", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "retrieval-scenes-12-99.json").read_text())
    assert report["images"] == 12 and report["texts"] == 12 and report["chance_R@1"] == pytest.approx(100 / 12)
    for mode in ("itc", "itc+itm"):
        for direction in ("image_to_text", "text_to_image"):
            recalls = report[mode][direction]
            assert 0 <= recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"] <= 100
    assert "R@1" in result.stdout


def test_augmented_uncached_run(tmp_path):
    """The other data path: images decoded, augmented and encoded every step (no feature cache)."""
    run(command(tmp_path, "data.augment=true", "data.cache_features=false", "train.steps=2", "train.save_every=2",
                "train.log_every=1"))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    assert not (tmp_path / "features").exists()


def test_augment_with_cache_is_refused(tmp_path):
    result = subprocess.run(command(tmp_path, "data.augment=true"), cwd=ROOT, capture_output=True, text=True,
                            env=env(), timeout=120)
    assert result.returncode == 2 and "cache_features needs data.augment: false" in result.stderr


def test_retrieval_recipe_options_run_and_round_trip(tmp_path, cache):
    """text_pooling, pretrained_lr_scale (on a scratch Q-Former it has nothing to scale) and data.repeat: the run
    sees the repeated pairs, reuses the same feature cache, and the checkpoint keeps the pooling."""
    result = run(command(tmp_path, f"data.cache_dir={cache}", "qformer.text_pooling=mean",
                         "optim.pretrained_lr_scale=0.1", "data.repeat={scenes: 2}", "train.steps=2"))
    assert "stage 1: 96 pairs" in result.stdout + result.stderr  # 48 scenes, each twice
    model, config = load_stage1(tmp_path / "stage1")
    assert config["text_pooling"] == "mean" and model.text_pooling == "mean"
    assert len(list(Path(cache).iterdir())) == 1  # the repeat is not part of the cache key
