"""The training loop shared by every stage: 1 or N processes (accelerate), mixed precision, gradient accumulation,
atomic checkpoints, exact resume, progress and logs.

Exact resume rests on two choices:
- the data order is a pure function of (seed, epoch, position): ``GlobalBatchSampler`` can start at any step, so
  a resumed run reads exactly the batches the interrupted run would have read next, with no RNG replay;
- everything else that carries state (model, optimizer, LR schedule, torch/numpy/python RNGs) is saved by
  ``accelerator.save_state`` into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .config import OptimConfig, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclass
class LoopConfig:
    steps: int
    batch_size: int  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 42
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    num_workers: int = 0

    @classmethod
    def of(cls, train: TrainConfig, optim: OptimConfig) -> LoopConfig:
        """The loop settings of a run config's ``train`` and ``optim`` sections."""
        return cls(
            steps=train.steps, batch_size=train.batch_size, grad_accum=train.grad_accum, lr=optim.lr,
            min_lr=optim.min_lr, warmup_steps=optim.warmup_steps, weight_decay=optim.weight_decay,
            betas=tuple(optim.betas), max_grad_norm=optim.max_grad_norm, mixed_precision=train.mixed_precision,
            seed=train.seed, log_every=train.log_every, save_every=train.save_every,
            keep_checkpoints=train.keep_checkpoints, num_workers=train.num_workers,
        )


class GlobalBatchSampler(Sampler):
    """Yields this process's slice of each global batch, forever, in an order fixed by (seed, epoch).

    Global batch k of an epoch is ``perm[k*G:(k+1)*G]`` with G = batch_size * world_size; process r takes rows
    ``r*B:(r+1)*B`` of it. One process with batch G therefore sees exactly what N processes see together, which is
    what makes 1- and N-process runs comparable step for step. Incomplete tail batches are dropped.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int = 0):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world_size
        self.seed, self.start_batch = seed, start_batch
        self.global_batch = batch_size * world_size
        self.per_epoch = size // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"The dataset has {size} items, fewer than one global batch of {self.global_batch}.")

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start_batch
        while True:
            epoch, k = divmod(index, self.per_epoch)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            batch = perm[k * self.global_batch:(k + 1) * self.global_batch]
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
            index += 1

    def __len__(self):  # infinite; DataLoader needs a length only for len(loader)
        return 2**62


def param_groups(model: torch.nn.Module, cfg: LoopConfig, lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only, and a learning rate of ``cfg.lr * lr_scale(name)`` per parameter
    (e.g. layer-wise decay for a fine-tuned image encoder). The schedule multiplies every group's own rate."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = lr_scale(name) if lr_scale is not None else 1.0
        decay = cfg.weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(param)
    return [{"params": params, "lr": cfg.lr * scale, "weight_decay": decay}
            for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1]))]


def cosine_lr(step: int, cfg: LoopConfig) -> float:
    """Multiplier on cfg.lr: linear warmup, then cosine decay to min_lr at cfg.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class MetricsLog:
    """metrics.csv (and TensorBoard when installed) on the main process. On resume, rows past the resumed step
    are dropped so the curve continues as if the run had never stopped."""

    def __init__(self, folder: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = folder / "metrics.csv"
        self.writer = None
        self.fields: list[str] | None = None
        if not enabled:
            return
        if self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
            if rows:
                self.fields = list(rows[0].keys())
                with self.path.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(rows)
            else:
                self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)
        except Exception:  # tensorboard is optional
            self.writer = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        new = not self.path.exists()
        if self.fields is None:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = output_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = output_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


class _TiedWeightsNotice(logging.Filter):
    """accelerate warns "Removed shared tensor ... while saving" for every checkpoint of a model with tied weights
    (stage 1's ITG head shares the word embeddings). safetensors cannot store one tensor twice; the tie is restored
    by the model itself on load, and the exact-resume tests prove the reloaded state equal. Said at every save,
    the warning only alarms."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """accelerate state -> checkpoints/.tmp-step_N -> checkpoints/step_N, then the 'latest' pointer (atomic)."""
    root = output_dir / CHECKPOINTS
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / LATEST)
        for old in sorted(p for p in root.glob("step_*") if p.name != name)[:-max(0, keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def make_accelerator(mixed_precision: str | bool = "no") -> Accelerator:
    if mixed_precision is False or mixed_precision is None:
        mixed_precision = "no"  # YAML reads an unquoted `no` (e.g. train.mixed_precision=no) as false
    # One scheduler step per optimizer step. accelerate's default steps the LR schedule once per process each
    # step (it assumes per-process schedules), which would decay N times faster on N processes.
    return Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)


def fit(
    cfg: LoopConfig,
    model: torch.nn.Module,
    dataset,
    collate: Callable,
    compute_losses: Callable,  # (model, batch, micro_step) -> object with .loss and .items()
    output_dir: Path,
    *,
    resume: bool = False,
    on_checkpoint: Callable[[torch.nn.Module, int], None] | None = None,
    accelerator: Accelerator | None = None,
    lr_scale: Callable[[str], float] | None = None,
) -> dict:
    """Train ``model`` for ``cfg.steps`` optimizer steps; returns the last logged metrics."""
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(param_groups(model, cfg, lr_scale), lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step = 0
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from step 0", output_dir)
        else:
            accelerator.load_state(str(checkpoint))
            start_step = json.loads((checkpoint / "state.json").read_text())["step"]
            accelerator.print(f"Resumed from {checkpoint} at step {start_step}")

    micro_per_step = cfg.grad_accum
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, accelerator.process_index,
                                 accelerator.num_processes, cfg.seed, start_batch=start_step * micro_per_step)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    batches = iter(loader)
    log = MetricsLog(output_dir, start_step, accelerator.is_main_process)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
    global_batch = cfg.batch_size * accelerator.num_processes * micro_per_step
    t0, samples, last = time.perf_counter(), 0, {}
    model.train()
    for step in range(start_step, cfg.steps):
        totals: dict[str, float] = {}
        for micro in range(micro_per_step):
            batch = next(batches)
            sync = micro == micro_per_step - 1
            context = accelerator.no_sync(model) if not sync else _null()
            with context, accelerator.autocast():
                losses = compute_losses(model, batch, step * micro_per_step + micro)
                accelerator.backward(losses.loss / micro_per_step)
            for k, v in losses.items().items():
                totals[k] = totals.get(k, 0.0) + v / micro_per_step
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples += global_batch
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            # Mean over processes: the global batch's loss, comparable across process counts.
            values = torch.tensor(list(totals.values()), device=accelerator.device)
            values = accelerator.reduce(values, reduction="mean").tolist()
            rate = samples / (time.perf_counter() - t0)
            last = {**dict(zip(totals, values)), "lr": scheduler.get_last_lr()[0], "samples_per_s": rate}
            log.log(done, last)
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items() if k != "lr"})
            t0, samples = time.perf_counter(), 0
        bar.update(1)
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(accelerator, output_dir, done, cfg.keep_checkpoints)
            if on_checkpoint is not None and accelerator.is_main_process:
                on_checkpoint(accelerator.unwrap_model(model), done)
            accelerator.wait_for_everyone()
    bar.close()
    return last


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
