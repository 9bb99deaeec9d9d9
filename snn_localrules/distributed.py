"""torch.distributed glue for the rules: which process group a wrapped model trains in, and a row gather
that autograd can go through (TP's contrastive loss compares each sample with the whole global batch).

Nothing here runs unless a process group is initialised and the model is wrapped in
``DistributedDataParallel`` (or the user names a group), so single-process training never touches
``torch.distributed``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


def model_group(model: nn.Module) -> Optional[Any]:
    """The process group a ``DistributedDataParallel`` model all-reduces its gradients in, or None when
    the model is not DDP-wrapped, no group is initialised, or the group has a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    group = getattr(model, "process_group", None)
    return group if dist.get_world_size(group) > 1 else None


def mean_over_group(value: float, group: Any, device: torch.device) -> float:
    """The mean of a per-process number over the group (each process passes its own)."""
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return float(tensor) / dist.get_world_size(group)


def finite_on_every_process(value: torch.Tensor, group: Optional[Any]) -> bool:
    """Whether ``value`` is finite here and, with a ``group``, on every process of it: a failing step must
    raise on all processes together, or the others would wait forever in the next collective."""
    finite = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if group is not None:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    return bool(finite)


def gather_sizes(rows: int, group: Any, device: torch.device) -> List[int]:
    """Every process's row count, in rank order (batches may differ by rank, e.g. the last one)."""
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with a backward: every process's loss may depend on every process's rows,
    so the gradient of this process's rows is the sum over processes of their losses' gradients with
    respect to them (all-reduced, then this process's slice taken). Works on every backend: it uses only
    all_gather and all_reduce (gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any, sizes: List[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank(group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(tensor: torch.Tensor, group: Any, sizes: List[int]) -> torch.Tensor:
    """``[n_rank, ...]`` on each process -> ``[sum(sizes), ...]``, rows in rank order, differentiable.

    Every process must call it at the same point with its own rows (``sizes`` from :func:`gather_sizes`).
    """
    return _GatherRows.apply(tensor, group, sizes)


def row_offset(group: Any, sizes: List[int]) -> int:
    """Index of this process's first row in the gathered batch."""
    return sum(sizes[: dist.get_rank(group)])


def keep_neuron_state_local(model: nn.Module, neurons: Sequence[Any]) -> List[str]:
    """Keep each process's neuron state its own under ``DistributedDataParallel``.

    DDP copies every buffer of rank 0 to the other processes at each forward (``broadcast_buffers``, its
    default), and snnTorch keeps the neurons' membranes in buffers: every process would carry on from rank
    0's membrane, for the rest of the batch. The neurons' state buffers are added to the names DDP leaves
    out of that copy (its ``parameters_to_ignore``, which it reads at every forward); batch-norm
    statistics and other buffers are still copied as before.

    :return: the names added, for :func:`release_neuron_state` (none for a model that is not DDP).
    """
    ignored = getattr(model, "parameters_to_ignore", None)
    if not isinstance(model, nn.parallel.DistributedDataParallel) or not isinstance(ignored, set):
        return []
    names = {id(module): name for name, module in model.module.named_modules()}
    added = []
    for neuron in neurons:
        prefix = names.get(id(neuron.module))
        if prefix is None:
            continue
        for state in neuron.state_names:
            full = f"{prefix}.{state}" if prefix else state
            if state in neuron.module._buffers and full not in ignored:
                added.append(full)
    ignored.update(added)
    return added


def release_neuron_state(model: nn.Module, added: Sequence[str]) -> None:
    """Take the names :func:`keep_neuron_state_local` added off ``model``'s DDP list again (the model the
    learner holds: a deep copy of a learner releases its own copy's)."""
    ignored = getattr(model, "parameters_to_ignore", None)
    if isinstance(ignored, set):
        ignored.difference_update(added)
