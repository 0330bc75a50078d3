"""Collectives that are no-ops in a single process, so the same loss code runs on 1 or N processes."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def max_over_processes(value: int) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value])
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return int(tensor)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient). Equal shapes on all ranks required."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def global_token_mean(loss_sum: torch.Tensor, token_count: torch.Tensor) -> torch.Tensor:
    """A per-process summed token loss -> the mean over every token of the global batch, scaled so that DDP's
    gradient averaging over processes gives exactly the one-process gradient."""
    total = gather(token_count.reshape(1)).sum().clamp(min=1)
    return loss_sum * world_size() / total


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's slice. (torch's own
    ``distributed.nn.all_gather`` gave wrong gradients on the gloo backend in our two-process test.)"""

    @staticmethod
    def forward(ctx, tensor):
        ctx.batch = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)  # every process's loss contributes to every slice
        start = rank() * ctx.batch
        return grad[start:start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather`, but gradients flow back to every process's input, so the gradient of a loss over the
    gathered batch, summed over processes, equals the single-process gradient."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)
