"""torch.distributed helpers that fall back to single-process behaviour.

The process group itself is created by Accelerate / torchrun; this module only uses it. With one process every
helper is the identity (shuffle-BN included: BatchNorm statistics over one local batch do not depend on the order
of its samples), so every unit test runs on one CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def gather_sizes(size: int, device: torch.device) -> list[int]:
    """Every process's batch size, in rank order (`[size]` with one process).

    The one host synchronisation a distributed step needs: the gathers below pad to the largest batch and must
    know how many rows each rank really sent. A step reads it once and passes it to every gather of that step.
    """
    if not is_distributed():
        return [size]
    local = torch.tensor([size], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return torch.cat(sizes).tolist()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, in rank order.

    *No gradient flows through the gather.* Ranks may hold different numbers of rows (a batch that lost
    undecodable images): rows are padded to the largest count for `all_gather`, then the padding is dropped.
    `sizes` (`gather_sizes`, all the same step's batches) saves gathering them again. Bool tensors are sent as
    uint8 (gloo has no bool all_gather).
    """
    if not is_distributed():
        return tensor.detach()
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device)
    as_bool = tensor.dtype == torch.bool
    send = tensor.detach().to(torch.uint8) if as_bool else tensor.detach()
    max_size = max(sizes)
    if send.shape[0] < max_size:
        pad = send.new_zeros((max_size - send.shape[0], *send.shape[1:]))
        send = torch.cat([send, pad])
    gathered = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(gathered, send.contiguous())
    out = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])
    return out.bool() if as_bool else out


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """MoCo's shuffle-BN: give each process a random slice of the global batch before the momentum forward.

    Without it, BatchNorm in the key encoder sees the same sub-batch as the query and the instance task can be
    solved through batch statistics ("leak"). Returns the local shuffled batch, the global inverse permutation and
    the per-rank sizes needed by `batch_unshuffle` (`sizes`, if given, are this step's `gather_sizes`). Any dtype
    travels: a uint8 image batch is gathered at a quarter of float32's bytes and normalised after.
    """
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device), [x.shape[0]]
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    x_all = concat_all_gather(x, sizes)  # (sum(sizes), ...)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)  # every rank must use the same permutation
    start = sum(sizes[: rank()])
    local = perm[start : start + sizes[rank()]]
    return x_all[local], torch.argsort(perm), sizes


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, inverse_perm: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Undo `batch_shuffle`: return this process's rows of `y` in their original order."""
    if not is_distributed():
        return y
    y_all = concat_all_gather(y, sizes)
    start = sum(sizes[: rank()])
    return y_all[inverse_perm[start : start + sizes[rank()]]]


__all__ = [
    "batch_shuffle", "batch_unshuffle", "concat_all_gather", "gather_sizes", "is_distributed", "rank", "world_size",
]  # fmt: skip
