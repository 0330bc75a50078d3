"""Streaming from tar shards (``{type: shards}``): the engine's SampleStream resumes at the sample it stopped at, and
2 processes (gloo, `accelerate launch`) read every sample exactly once per epoch, reshuffled between epochs."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from test_stage1_run import env, kill_after_checkpoint
from test_stage2 import losses, stage1_tiny, train  # noqa: F401  (stage1_tiny is a fixture)
from training.engine import SampleStream

ROOT = Path(__file__).resolve().parents[2]
SHARDS, PER_SHARD = 4, 3


class Numbers(IterableDataset):
    """0..n-1 in an order fixed by the epoch."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())


def test_stream_crosses_epochs_and_resumes_at_its_position():
    stream = SampleStream(Numbers(5), batch_size=2, collate=list)
    batches = iter(stream)
    first = [next(batches) for _ in range(3)]
    position = stream.position
    rest = [next(batches) for _ in range(4)]
    epoch0 = Numbers(5).__iter__()
    assert sum(first, [])[:5] == list(epoch0)  # the 3rd batch straddles the epoch's end: nothing dropped
    assert sorted(sum(first + rest, [])[5:10]) == list(range(5))  # epoch 1: every number once, in another order
    assert position == (1, 1)
    resumed = iter(SampleStream(Numbers(5), batch_size=2, collate=list, position=position))
    assert [next(resumed) for _ in range(4)] == rest


def test_empty_share_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="no samples"):
        next(iter(SampleStream(Numbers(0), batch_size=2, collate=list)))


# -- 2 processes over real tar shards ----------------------------------------------------------------------------
WORKER = '''
import json, sys
from pathlib import Path

import torch

from training.data.sources import build_source
from training.engine import LoopConfig, fit, make_accelerator

out, pattern, steps, resume = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
accelerator = make_accelerator()
dataset = build_source({"type": "shards", "pattern": pattern, "seed": 3})
seen = []


class Loss:
    def __init__(self, loss):
        self.loss = loss

    def items(self):
        return {"loss": float(self.loss)}


def compute_losses(model, ids, micro_step):
    seen.append(ids)
    return Loss(model(torch.ones(len(ids), 1)).pow(2).mean())


fit(LoopConfig(steps=steps, batch_size=2, save_every=2, log_every=1, max_grad_norm=None), torch.nn.Linear(1, 1),
    dataset, lambda items: [item["id"] for item in items], compute_losses, out, resume=resume, accelerator=accelerator)
name = f"ids_{accelerator.process_index}_{'resumed' if resume else 'first'}.json"
(out / name).write_text(json.dumps(seen))
'''


def write_shards(folder: Path) -> list[str]:
    from PIL import Image

    ids = []
    for s in range(SHARDS):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(PER_SHARD):
                png = io.BytesIO()
                Image.new("RGB", (8, 8), (40 * s, 60 * k, 90)).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", f"shard {s} sample {k}".encode())):
                    info = tarfile.TarInfo(f"s{k}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ids.append(f"{s:05d}/s{k}")
    return ids


def launch(script, out, pattern, steps, resume=False):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out),
           pattern, str(steps), "resume" if resume else "first"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**env(), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]


def seen(out, rank, run="first"):
    return json.loads((out / f"ids_{rank}_{run}.json").read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    ids = write_shards(folder)
    script = folder / "worker.py"
    script.write_text(WORKER)
    return ids, str(folder / f"{{00000..{SHARDS - 1:05d}}}.tar"), script


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    _, pattern, script = shards
    out = tmp_path_factory.mktemp("full")
    launch(script, out, pattern, steps=6)  # 2 processes x 2 samples x 6 steps = 2 epochs of 12
    return out


@pytest.mark.slow
def test_two_processes_see_every_sample_once_per_epoch(shards, full_run):
    ids, _, _ = shards
    per_rank = [sum(seen(full_run, rank), []) for rank in (0, 1)]
    assert [len(r) for r in per_rank] == [12, 12]
    epochs = [per_rank[0][6 * e:6 * (e + 1)] + per_rank[1][6 * e:6 * (e + 1)] for e in (0, 1)]  # 6 per rank each
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 12 and set(epoch) == set(ids)  # all of them, none twice
    assert per_rank[0][:6] != per_rank[0][6:]  # the shard order is reshuffled between epochs


@pytest.mark.slow
def test_stopped_and_resumed_stream_reads_what_the_full_run_read(shards, full_run, tmp_path):
    _, pattern, script = shards
    launch(script, tmp_path, pattern, steps=4)  # stops in epoch 1, 2 samples into each process's share
    state = json.loads((tmp_path / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["stream_positions"] == [[1, 2], [1, 2]]
    launch(script, tmp_path, pattern, steps=6, resume=True)
    for rank in (0, 1):
        assert seen(tmp_path, rank) + seen(tmp_path, rank, "resumed") == seen(full_run, rank)


def test_streamed_sources_are_refused_where_items_are_indexed(tmp_path):
    from training.config import ConfigError, Stage2Config, load_config
    from training.data.sources import build_source
    from training.stage2 import check

    with pytest.raises(ConfigError, match="needs a pattern"):
        build_source({"type": "shards"})
    shards = 'data.sources=[{type: shards, pattern: "x/*.tar"}]'
    streamed = [shards, "data.cache_features=false"]
    for overrides in ([shards], [*streamed, "task=vqa"],
                      [*streamed, 'data.sources=[{type: shards, pattern: "x/*.tar"}, {type: scenes, n: 4}]']):
        cfg = load_config(str(ROOT / "training/configs/stage2_tiny.yaml"), overrides, Stage2Config)
        with pytest.raises(ConfigError, match="make it the only source, with data.cache_features: false, task "
                                              "pretrain or caption"):
            check(cfg)
    check(load_config(str(ROOT / "training/configs/stage2_tiny.yaml"), streamed, Stage2Config))


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory):
    """24 captioned scene pictures in 3 tar shards."""
    from training.data import Scenes

    folder = tmp_path_factory.mktemp("scene-shards")
    scenes = Scenes(24, seed=1)
    for s in range(3):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(8):
                item = scenes[8 * s + k]
                png = io.BytesIO()
                item["image"].save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", item["text"].encode())):
                    info = tarfile.TarInfo(f"scene{k}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "{00000..00002}.tar")


@pytest.mark.slow
def test_stage2_streams_shards_resumes_exactly_and_exports(stage1_tiny, scene_shards, tmp_path):
    """Stage 2 on tar shards (no feature cache: the frozen encoder embeds each batch): 6 steps of 8 cross 2 epochs
    of 24; stopped after step 4 and resumed, it reads the same samples and gives the same losses; blip2 loads it."""
    import blip2
    from safetensors.torch import load_file

    stage1, _ = stage1_tiny
    common = ["stage2", "--config", "training/configs/stage2_tiny.yaml", f"init_from={stage1}",
              f'data.sources=[{{type: shards, pattern: "{scene_shards}", seed: 0}}]', "data.cache_features=false",
              "train.log_every=1", "train.save_every=2", "qformer.dropout=0.0", "export.dtype=float32"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    result = train(*common, "train.steps=6", f"output_dir={full}")
    assert "streamed examples" in result.stdout
    full_losses = losses(full)
    assert len(full_losses) == 6 and full_losses[-1] < full_losses[0]
    # kill -9 right after the step-4 checkpoint, then resume.
    kill_after_checkpoint([sys.executable, "-m", "training", *common, "train.steps=6", f"output_dir={stopped}"],
                          stopped, step=4)
    state = json.loads((stopped / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["stream_positions"] == [[1, 8]]  # 32 samples read: all 24 of epoch 0, 8 of epoch 1
    train(*common, "train.steps=6", f"output_dir={stopped}", "--resume")
    assert losses(stopped) == pytest.approx(full_losses, rel=1e-6)
    weights_full = load_file(full / "checkpoint" / "trained.safetensors")
    weights_resumed = load_file(stopped / "checkpoint" / "trained.safetensors")
    assert all(torch.allclose(weights_resumed[k], weights_full[k], atol=1e-6) for k in weights_full)
    model = blip2.load(str(full / "checkpoint"), precision="fp32", device="cpu")
    assert not model.info.untrained
    metadata = json.loads((full / "checkpoint" / "blip2_config.json").read_text())["metadata"]
    assert metadata["sources"][0]["type"] == "shards" and metadata["step"] == 6
