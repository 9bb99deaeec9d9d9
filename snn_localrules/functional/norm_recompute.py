"""A fused SLTT neuron fed by a batch norm keeps nothing of its own for backward.

Under SLTT the backward of a multi-step neuron needs the charged membrane ``H[t]`` of every step and
nothing else (``sltt_multistep``). ``H`` follows from the neuron's input ``X`` and its spikes by the
forward recurrence, which is elementwise and cheap. When ``X`` is the output of a batch norm, ``X`` itself
follows from the batch norm's input, which the batch norm already keeps for its own backward. So such a
neuron need not keep ``H`` (4 bytes per value in fp32): it keeps a reference to the batch norm's saved input
(the same storage: no extra memory), the affine parameters, and its spikes (which the next layer keeps
anyway, as 1-byte values with ``pack_spikes``; a call of one step with a soft reset, online SLTT's chunk 1,
needs none), and rebuilds ``X`` and then ``H`` in backward.

The rebuilt ``X`` is the batch norm's own kernel run again on the same input (statistics included), so it
equals the forward's (to rounding at most, should a kernel reduce in a different order on a second call),
and ``H`` is rebuilt with the forward's own spikes, so no spike can flip; the gradients equal the kept-``H``
gradients (tested to 1e-5).

Only a batch norm whose output is exactly ``(x - mean) / sqrt(var + eps) * weight + bias`` over every
dimension but the channel qualifies: ``torch.nn.BatchNorm1d/2d/3d`` and SpikingJelly's
``layer.BatchNorm1d/2d/3d`` (both step modes), subclasses that do not change ``forward``; not
``SyncBatchNorm`` (its statistics span processes), nor SpikingJelly's threshold-dependent or
through-time variants. It must feed the neuron directly (the same storage, unmodified), in float32 or
float64 (a half-precision output rebuilt by another kernel could differ by a rounding step that moves ``H``
by more than the tolerance). Everything else keeps ``H`` as before.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

_NORM_DTYPES = (torch.float32, torch.float64)
_SJ_LAYER_MODULES = ("spikingjelly.activation_based.layer",)
_SJ_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


def _forward_owner(cls: type) -> Optional[type]:
    for ancestor in cls.__mro__:
        if "forward" in vars(ancestor):
            return ancestor
    return None


def channel_dim(module: nn.Module) -> Optional[int]:
    """The channel dimension of ``module``'s input when ``module`` is a batch norm this module can
    rebuild (see the module docstring), else None: 1, or 2 for a SpikingJelly norm in multi-step mode
    (``[T, N, C, ...]``, normalised over T and N together)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
        return None
    owner = _forward_owner(type(module))
    if owner is nn.modules.batchnorm._BatchNorm:
        return 1
    if owner is not None and owner.__name__ in _SJ_NORMS and owner.__module__.startswith(_SJ_LAYER_MODULES):
        return 2 if getattr(module, "step_mode", "s") == "m" else 1
    return None


@dataclass
class NormSource:
    """How to rebuild one batch norm's output from its input: ``scale * x + shift`` per channel."""

    input: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]  # None: batch statistics, computed again from ``input``
    running_var: Optional[torch.Tensor]
    eps: float
    channel_dim: int

    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return (self.input, self.weight, self.bias, self.running_mean, self.running_var)

    @staticmethod
    def rebuild(saved: Tuple[Optional[torch.Tensor], ...], eps: float, dim: int) -> torch.Tensor:
        """The batch norm's output, from the tensors of :meth:`tensors` as autograd gives them back: the
        same ``batch_norm`` kernel as the norm's forward (SpikingJelly's multi-step form folds T into the
        batch, as its forward does), without touching the running statistics."""
        x, weight, bias, running_mean, running_var = saved
        flat = x.flatten(0, dim - 1) if dim > 1 else x
        y = torch.nn.functional.batch_norm(
            flat, running_mean, running_var, weight, bias, training=running_mean is None, momentum=0.0, eps=eps)
        return y.view(x.shape)


class NormSources:
    """Forward hooks for batch norms that remember, while a forward runs, which tensors are a batch norm's
    output and how to rebuild them. Use :meth:`enter`/:meth:`exit` around the model's forward (entries
    are dropped at exit; a tensor freed or modified in place before it is looked up is not matched)."""

    def __init__(self) -> None:
        # output storage address -> (output owner, output version, source, input version)
        self._entries: Dict[int, Tuple[weakref.ref, int, NormSource, int]] = {}
        self._depth = 0

    def enter(self) -> None:
        self._depth += 1

    def exit(self) -> None:
        if self._depth:
            self._depth -= 1
            if not self._depth:
                self._entries.clear()

    def record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """The forward hook (install on modules with a :func:`channel_dim`)."""
        if not self._depth or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)():
            return  # a traced graph keeps what it keeps
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        dim = channel_dim(module)
        if dim is None or not isinstance(x, torch.Tensor) or not output.requires_grad:
            return
        if output.dtype not in _NORM_DTYPES or x.dtype != output.dtype or x.shape != output.shape:
            return
        if x.ndim <= dim or x.shape[dim] != module.num_features:
            return
        batch_stats = module.training or module.running_mean is None
        if not batch_stats and module.running_var is None:
            return
        address = output.untyped_storage().data_ptr()
        if not address or not output.is_contiguous() or output.numel() * output.element_size() != output.untyped_storage().nbytes():
            return
        source = NormSource(
            input=x,
            weight=module.weight if module.affine else None,
            bias=module.bias if module.affine else None,
            # eval mode: the statistics as they are now (an optimizer cannot change buffers, a later
            # training-mode call would): copies, C values each
            running_mean=None if batch_stats else module.running_mean.detach().clone(),
            running_var=None if batch_stats else module.running_var.detach().clone(),
            eps=float(module.eps),
            channel_dim=dim,
        )
        owner = output._base if output._base is not None else output
        self._entries[address] = (weakref.ref(owner), output._version, source, x._version)

    def source_of(self, tensor: torch.Tensor) -> Optional[NormSource]:
        """The :class:`NormSource` whose output ``tensor`` is (the whole storage, unmodified), else None."""
        if not self._entries or not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
            return None
        entry = self._entries.get(tensor.untyped_storage().data_ptr())
        if entry is None:
            return None
        ref, version, source, input_version = entry
        owner = ref()
        if owner is None or owner._version != version or tensor._version != version:
            return None
        if tensor.numel() != source.input.numel() or tensor.dtype != source.input.dtype:
            return None
        if source.input._version != input_version:
            return None  # the batch norm's input changed since: it no longer rebuilds this output
        return source


@dataclass(frozen=True)
class _Pending:
    address: int
    version: int
    source: NormSource
    packer: Any


#: the source of the fused call about to run, set by the SLTT rule around an adapter's fused call
_PENDING: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("snn_localrules_norm_source", default=None)


#: whether a fused call may charge its membrane again in backward rather than keep it (the SLTT rule's
#: ``recompute_membrane``); on by default for direct calls of the fused function
_RECHARGE: contextvars.ContextVar[bool] = contextvars.ContextVar("snn_localrules_recharge", default=True)


@contextlib.contextmanager
def rebuild_input_from(output: torch.Tensor, source: Optional[NormSource], packer: Any = None,
                       recharge: bool = True) -> Iterator[None]:
    """While active, a fused SLTT neuron call whose input is ``output`` (``source``'s output) keeps ``source``
    instead of its membrane; ``packer`` (a ``SpikePacker`` or None) learns its spikes before they are saved.
    ``recharge=False``: the call keeps its membrane in every case (see :func:`recharge_allowed`)."""
    pending = None
    if source is not None:
        pending = _Pending(output.untyped_storage().data_ptr(), output._version, source, packer)
    token, recharge_token = _PENDING.set(pending), _RECHARGE.set(bool(recharge))
    try:
        yield
    finally:
        _PENDING.reset(token)
        _RECHARGE.reset(recharge_token)


def recharge_allowed() -> bool:
    """Whether a fused call that keeps its input anyway (PLIF with ``decay_input``, whose ``w`` gradient
    needs it) may drop its membrane and charge it again from that input in backward: True unless a
    :func:`rebuild_input_from` with ``recharge=False`` is active."""
    return _RECHARGE.get()


def pending_source(x_seq: torch.Tensor) -> Optional[Tuple[NormSource, Any]]:
    """``(source, packer)`` when a :func:`rebuild_input_from` is active and ``x_seq`` is its output, the whole
    storage, unmodified; else None."""
    pending = _PENDING.get()
    if pending is None or not x_seq.is_contiguous() or x_seq._version != pending.version:
        return None
    if x_seq.untyped_storage().data_ptr() != pending.address or x_seq.storage_offset() != 0:
        return None
    if x_seq.numel() != pending.source.input.numel() or x_seq.dtype != pending.source.input.dtype:
        return None
    return pending.source, pending.packer
