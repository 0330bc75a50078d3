"""The training loop shared by every stage: 1 or N processes (accelerate), mixed precision, gradient accumulation,
atomic checkpoints, exact resume, progress and logs.

Exact resume rests on two choices:
- the data order is a pure function of (seed, epoch, position): ``GlobalBatchSampler`` can start at any step, so
  a resumed run reads exactly the batches the interrupted run would have read next, with no RNG replay;
- everything else that carries state (model, optimizer, LR schedule, torch/numpy/python RNGs) is saved by
  ``accelerator.save_state`` into a temporary folder that is renamed into place only when complete.

A streamed dataset (an ``IterableDataset`` such as ``WebDatasetShards``) has no index to start from: ``SampleStream``
counts what each process consumed and the checkpoint keeps that position instead.

The same loop runs under DDP, FSDP2 and DeepSpeed (``training/accelerate/*.yaml``). Under FSDP the training
checkpoint is sharded (one file per process) and ``on_checkpoint`` gets the full weights gathered from the shards.
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
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object, set_seed
from torch.utils.data import DataLoader, IterableDataset, Sampler
from tqdm.auto import tqdm

from .config import ConfigError, OptimConfig, TrainConfig

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


class SampleStream:
    """Batches from an ``IterableDataset`` that splits itself across processes (``WebDatasetShards``): data too big
    for a map-style index, read once per epoch, with a position to resume from.

    This process's stream is its share of epoch 0, then of epoch 1 (``dataset.set_epoch`` reshuffles), and so on;
    batches are consecutive runs of ``batch_size`` samples, so the batch that straddles an epoch's end takes the next
    epoch's first samples and nothing is dropped. ``position`` is (epoch, samples of it this process has consumed):
    saved with each checkpoint and skipped on resume, so a resumed run reads exactly what the interrupted one would
    have read next. Skipping reads the skipped samples again (a stream has no index). Samples come one at a time
    from a DataLoader (``batch_size=None``) whose workers each read their own shards; its order is fixed (in-order
    round robin), which is what makes the skip exact."""

    def __init__(self, dataset, batch_size: int, collate: Callable, num_workers: int = 0,
                 position: tuple[int, int] = (0, 0)):
        self.dataset, self.batch_size, self.collate, self.num_workers = dataset, batch_size, collate, num_workers
        self.epoch, self.index = position

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def _samples(self) -> Iterator:
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
            count = 0
            for count, sample in enumerate(loader, start=1):
                if count > self.index:  # before: consumed before the resume
                    self.index = count
                    yield sample
            if count == 0:
                raise RuntimeError(f"Process {_rank()} has no samples in epoch {self.epoch}: fewer shards or "
                                   "samples than processes x DataLoader workers?")
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self) -> Iterator:
        samples = self._samples()
        while True:
            yield self.collate([next(samples) for _ in range(self.batch_size)])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int,
                    stream: SampleStream | None = None) -> None:
    """accelerate state -> checkpoints/.tmp-step_N -> checkpoints/step_N, then the 'latest' pointer (atomic).
    With a stream, state.json also keeps every process's position in it."""
    positions = gather_object([stream.position]) if stream is not None else None  # a collective: every process
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
        state = {"step": step} if positions is None else {"step": step, "stream_positions": positions}
        (tmp / "state.json").write_text(json.dumps(state))
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
    accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # accelerate finds no GPU and no ACCELERATE_USE_CPU: every process would train alone on the same folder.
        raise ConfigError(f"{launched} processes were launched but none joined a process group (no GPU found?). "
                          "For processes on CPU set ACCELERATE_USE_CPU=true.")
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ConfigError("DeepSpeed runs on GPUs only (accelerate ignores it on CPU, which would silently train "
                              "with plain DDP): use training/accelerate/fsdp2.yaml or ddp.yaml on CPU.")
        if _env_flag("ACCELERATE_USE_FSDP"):
            _fsdp_on_cpu(accelerator)
    return accelerator


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate (1.15) turns every CPU run into DDP over gloo (MULTI_CPU) and drops the FSDP plugin that
    ``accelerate launch --config_file training/accelerate/fsdp2.yaml`` asked for. torch's FSDP2 itself runs on CPU
    over gloo, so switch the state to FSDP: CPU runs (the tests) then take the same sharded prepare / save / load
    path as GPUs instead of quietly testing DDP."""
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        raise ConfigError("On CPU only FSDP2 runs (fsdp_version: 2, as in training/accelerate/fsdp2.yaml).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # accelerate re-creates AcceleratorState internally, copying PartialState's fields over it: both must say FSDP.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def shard_frozen(model: torch.nn.Module, accelerator: Accelerator) -> tuple[int, int]:
    """Under FSDP, shard a frozen transformers model that is kept *outside* the trained module (stage 2's LLM) with
    torch's ``fully_shard`` (FSDP2): one shard group per transformer block (``_no_split_modules``) and one for the
    rest, each all-gathered just before it runs, forward and backward. It holds no gradients or optimizer state and
    stays out of training checkpoints and exports, which hold only the trained parts. The input and output word
    embeddings stay whole on every process (``ignored_params``): the training code looks words up outside the
    model's forward, and most LLMs tie the two. Returns (weights this process holds, weights of the whole model);
    without FSDP the model is left as it is and holds them all."""
    total = sum(p.numel() for p in model.parameters())
    if accelerator.distributed_type != DistributedType.FSDP:
        return total, total
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"{type(model).__name__} names no transformer block class (_no_split_modules): FSDP "
                          "cannot shard it. Train it with DDP (training/accelerate/ddp.yaml).")
    words = {p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    reshard = accelerator.state.fsdp_plugin.reshard_after_forward
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    # Decoder-only stage 2 calls base_model (the LM head runs on the target positions only); an encoder-decoder is
    # called whole.
    fully_shard(model if model.config.is_encoder_decoder else model.base_model, reshard_after_forward=reshard,
                ignored_params=words)
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return held, total


def _broadcast_from_main(model: torch.nn.Module, device: torch.device) -> None:
    """DDP starts every process from process 0's weights; ``fully_shard`` keeps each process's own shard, so a part
    initialised differently per process (an unseeded layer) would train as a patchwork. Copy process 0's first."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            moved = tensor.data.to(device)  # NCCL broadcasts GPU tensors only
            torch.distributed.broadcast(moved, src=0)
            tensor.data.copy_(moved)


def _configure_deepspeed(accelerator: Accelerator, cfg: LoopConfig) -> None:
    """DeepSpeed reads batch size and clipping from its own config; the loop's values must reach it (we never hand
    accelerate a DataLoader to infer them from). The loop accumulates gradients itself, which DeepSpeed's engine
    (stepping on every ``backward`` that accelerate marks as synced) does not follow."""
    if cfg.grad_accum != 1:
        raise ConfigError("With DeepSpeed use train.grad_accum=1 (raise train.batch_size or the process count).")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["train_batch_size"] = cfg.batch_size * accelerator.num_processes
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0


class _FullWeights:
    """The trained model as an export sees it: its attributes, with the full weights that sharded training (FSDP,
    DeepSpeed) gathered in place of its shards. Exports read only attributes and ``state_dict()``."""

    def __init__(self, module: torch.nn.Module, state: dict):
        self._module, self._state = module, state

    def state_dict(self) -> dict:
        return self._state

    def __getattr__(self, name):
        return getattr(self._module, name)


def export_view(accelerator: Accelerator, model: torch.nn.Module):
    """What ``on_checkpoint`` gets. Call it on every process: gathering sharded weights is a collective."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return unwrapped  # every process holds the full weights
    return _FullWeights(unwrapped, accelerator.get_state_dict(model))


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
    if accelerator.distributed_type == DistributedType.FSDP:
        _broadcast_from_main(model, accelerator.device)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_step, positions = 0, None
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from step 0", output_dir)
        else:
            accelerator.load_state(str(checkpoint))
            state = json.loads((checkpoint / "state.json").read_text())
            start_step, positions = state["step"], state.get("stream_positions")
            accelerator.print(f"Resumed from {checkpoint} at step {start_step}")

    micro_per_step = cfg.grad_accum
    stream = None
    if isinstance(dataset, IterableDataset):
        if positions is not None and len(positions) != accelerator.num_processes:
            raise ConfigError(f"The checkpoint streamed data on {len(positions)} processes; resume it on as many "
                              f"(not {accelerator.num_processes}): each one's position is in its own shards.")
        if start_step and positions is None:
            raise ConfigError("The checkpoint has no stream position (it trained on a map-style dataset).")
        position = tuple(positions[accelerator.process_index]) if positions else (0, 0)
        stream = SampleStream(dataset, cfg.batch_size, collate, cfg.num_workers, position)
        batches = iter(stream)
    else:
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, accelerator.process_index,
                                     accelerator.num_processes, cfg.seed, start_batch=start_step * micro_per_step)
        batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers))
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
            save_checkpoint(accelerator, output_dir, done, cfg.keep_checkpoints, stream)
            if on_checkpoint is not None:
                view = export_view(accelerator, model)
                if accelerator.is_main_process:
                    on_checkpoint(view, done)
            accelerator.wait_for_everyone()
    bar.close()
    return last


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
