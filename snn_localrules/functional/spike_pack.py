"""Spikes saved for backward are stored as one byte per value instead of four (or two), exactly.

Autograd keeps the input of every layer for its backward: the conv or linear after a neuron layer saves
that layer's spikes, a ``[T, B, ...]`` float tensor of zeros and ones. This module packs such a tensor
into ``torch.bool`` when autograd saves it and unpacks it to the original dtype when backward needs it:
the same values bit for bit, so gradients are unchanged, and the saved copy takes a quarter of the
memory (fp32).

Only tensors *known* to hold such values are packed: outputs the fused SLTT neuron registered with
:meth:`SpikePacker.register` (its forward is a Heaviside, so its outputs are exactly 0 or 1), and the
outputs of pooling layers applied to them (:meth:`SpikePacker.derive`): a max pool of spikes is spikes, and
an average pool over a window of ``a`` values, ``a`` a power of two, gives exactly ``count / a`` (both the
sum of 0/1 values and a division by a power of two are exact in floating point), kept as the ``uint8``
count. A
registration is forgotten as soon as the spike tensor is freed (a weak reference), so a later tensor that
reuses the address is never mistaken for spikes, and it is ignored once the spikes are modified in place
(their version counter moved). While other saved-tensor hooks are active (``torch.utils.checkpoint``,
``torch.autograd.graph.save_on_cpu``, your own), the packer stands aside and theirs run unchanged.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch

_PACKED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _other_hooks_active() -> bool:
    """Whether saved-tensor hooks (someone else's) are active now.

    torch 2.11 answers directly. Older releases (2.6 has no query) are asked by a probe: one 0-d tensor
    saved in a throwaway graph, which then takes hooks of its own unless default hooks packed it already
    (so their pack hook sees that tensor). A probe that cannot run counts as hooks being active: no packing.
    """
    top: Optional[Callable] = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        return top(False) is not None
    with torch.enable_grad():
        probe = torch.zeros(()).requires_grad_().exp()  # ExpBackward saves its result
    try:
        probe.grad_fn._raw_saved_result.register_hooks(_identity, _identity)
    except (RuntimeError, AttributeError):
        return True
    return False


def can_push() -> bool:
    """Whether a packer entered now pushes its hooks: not while other saved-tensor hooks are active or
    saved-tensor hooks are disabled (``torch.autograd.graph.disable_saved_tensors_hooks``, where pushing
    raises), nor while torch compiles a graph (then it stands aside and theirs, or the graph's, run
    unchanged)."""
    if getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)():
        return False  # asked first: Dynamo cannot trace the queries below
    if not getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)():
        return False
    return not _other_hooks_active()


def others_on_top(packer: Optional["SpikePacker"] = None) -> Optional[bool]:
    """Whether saved-tensor hooks other than ``packer``'s are the ones active now (a
    ``torch.utils.checkpoint`` or ``save_on_cpu`` inside the model); None where this torch (before 2.8) has
    no query of them: the probe of :func:`_other_hooks_active` would save a tensor through them, which a
    checkpoint counts and would not see again when it recomputes."""
    top: Optional[Callable] = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    hooks = top(False)
    if hooks is None or (packer is not None and packer._pushed and hooks[0] == packer._pack):
        return False
    # an observer that keeps every tensor as it is (memory.SavedBytes) changes nothing that is saved
    return not getattr(getattr(hooks[0], "__self__", None), "keeps_saved_tensors_as_they_are", False)


#: the most values a pooled window may average (its counts must fit uint8, and be exact in bfloat16)
_MAX_SCALE = 128


class _Packed:
    """A spike tensor as autograd keeps it: ``uint8`` counts, their divisor and the dtype to restore."""

    __slots__ = ("counts", "scale", "dtype")

    def __init__(self, counts: torch.Tensor, scale: int, dtype: torch.dtype):
        self.counts = counts
        self.scale = scale
        self.dtype = dtype


def pooled_window(module: torch.nn.Module) -> Optional[Tuple[str, int]]:
    """``("max", 1)`` or ``("avg", a)`` when ``module`` maps spikes to values this packer can hold exactly:
    a max pool, or an average pool without padding, ceil mode or divisor override over windows of ``a``
    values, ``a`` a power of two; else None."""
    nn = torch.nn
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return None if module.return_indices else ("max", 1)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        dims = 1 if isinstance(module, nn.AvgPool1d) else 2 if isinstance(module, nn.AvgPool2d) else 3
        kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * dims
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        area = 1
        for k in kernel:
            area *= int(k)
        if any(int(p) != 0 for p in padding) or module.ceil_mode or getattr(module, "divisor_override", None):
            return None
        if area < 1 or area & (area - 1) or area > _MAX_SCALE:
            return None
        return ("avg", area)
    return None


class SpikePacker:
    """Saved-tensor hooks that store registered spike tensors as ``bool``.

    Use :meth:`activate` around a forward (re-entrant: nested activations count) and :meth:`register`
    on each binary tensor the forward makes. ``packed_bytes`` / ``saved_bytes`` count what was packed
    and what it would have cost, for tests and benchmarks.
    """

    def __init__(self) -> None:
        # storage address -> (tensor, version, scale): the values are count / scale, count in [0, scale]
        self._spikes: Dict[int, Tuple[weakref.ref, int, int]] = {}
        # storage address -> (version, the flat uint8 counts made of the tensor registered there): a spike
        # tensor that two nodes save (the fused neuron and the next layer) is packed once
        self._counts: Dict[int, Tuple[int, torch.Tensor]] = {}
        self._depth = 0
        self._pushed = False
        self.packed_bytes = 0
        self.saved_bytes = 0
        #: called with what is kept of each saved tensor (its packed counts, or the tensor itself) while
        #: the packer is pushed: how ``memory.SavedBytes`` counts through it (its own hooks would make the
        #: packer stand aside, and count what packing does not keep)
        self.observer: Optional[Callable[[torch.Tensor], Any]] = None

    # -- registration ------------------------------------------------------------------------------
    def register(self, spikes: torch.Tensor, scale: int = 1) -> None:
        """Declare that every value of ``spikes`` is ``count / scale`` with an integer count in
        ``[0, scale]`` (``scale=1``: binary). Only while active; other dtypes are ignored."""
        if not self._pushed or not isinstance(spikes, torch.Tensor) or spikes.dtype not in _PACKED_DTYPES:
            return
        # the weak reference goes to the tensor owning the storage: a view (a pooling layer's reshaped
        # output) may be dropped while later views of the same storage live on
        owner = spikes._base if spikes._base is not None else spikes
        storage = spikes.untyped_storage()
        if spikes.numel() * spikes.element_size() != storage.nbytes():
            return  # a part of a larger buffer: the rest of it may hold anything
        address = storage.data_ptr()
        if address:
            known = self._spikes.get(address)
            if known is None or known[0]() is not owner or known[1] != spikes._version:
                self._counts.pop(address, None)  # counts of an earlier tensor at this address
            self._spikes[address] = (weakref.ref(owner), spikes._version, int(scale))

    def derive(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        """A forward hook for pooling modules: when the input is registered spikes (or pooled spikes) and
        the pool keeps the values countable (:func:`pooled_window`), register the output too."""
        if not self._pushed or not isinstance(output, torch.Tensor):
            return
        source = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        scale = self._scale_of(source) if isinstance(source, torch.Tensor) else None
        window = pooled_window(module)
        if scale is None or window is None or scale * window[1] > _MAX_SCALE:
            return
        self.register(output, scale * window[1])

    def _scale_of(self, tensor: torch.Tensor) -> Optional[int]:
        if tensor.dtype not in _PACKED_DTYPES or tensor.layout != torch.strided:
            return None
        entry = self._spikes.get(tensor.untyped_storage().data_ptr())
        if entry is None:
            return None
        ref, version, scale = entry
        owner = ref()
        # alive: its storage cannot have been reused by another tensor; same version: not modified since
        if owner is not None and owner._version == version and tensor._version == version:
            return scale
        return None

    def _is_spikes(self, tensor: torch.Tensor) -> bool:
        return self._scale_of(tensor) is not None

    # -- the hooks ---------------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> Any:
        scale = self._scale_of(tensor)
        if scale is None:
            if self.observer is not None:
                self.observer(tensor)
            return tensor
        packed = self._packed(tensor, scale)
        if self.observer is not None:
            self.observer(packed.counts)
        return packed

    def _packed(self, tensor: torch.Tensor, scale: int) -> _Packed:
        # registered tensors span their whole storage; a contiguous view of it is the same values in order
        address = tensor.untyped_storage().data_ptr()
        shared = self._counts.get(address) if tensor.is_contiguous() else None
        if shared is not None and shared[0] == tensor._version:
            return _Packed(shared[1].view(tensor.shape), scale, tensor.dtype)
        values = tensor.detach()
        counts = (values if scale == 1 else values * scale).to(torch.uint8)
        self.packed_bytes += counts.numel() * counts.element_size()
        self.saved_bytes += tensor.numel() * tensor.element_size()  # a shared copy would have shared it too
        if tensor.is_contiguous():
            self._counts[address] = (tensor._version, counts.view(-1))
        return _Packed(counts, scale, tensor.dtype)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, _Packed):
            values = saved.counts.to(saved.dtype)
            return values if saved.scale == 1 else values.div_(saved.scale)
        return saved

    # -- activation --------------------------------------------------------------------------------
    def enter(self) -> None:
        """Start packing (outermost call), unless other saved-tensor hooks are active or torch is
        compiling a graph. Pair every ``enter`` with an :meth:`exit`."""
        self._depth += 1
        if self._depth > 1:
            return
        if not can_push():
            return
        torch._C._autograd._push_saved_tensors_default_hooks(self._pack, self._unpack)
        self._pushed = True

    def exit(self) -> None:
        """Stop packing (when the outermost :meth:`enter` ends). Registrations are dropped."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            if self._pushed:
                torch._C._autograd._pop_saved_tensors_default_hooks()
                self._pushed = False
            self._spikes.clear()
            self._counts.clear()

    def activate(self) -> "_Active":
        """``with packer.activate(): ...``"""
        return _Active(self)


class _Active:
    def __init__(self, packer: SpikePacker):
        self.packer = packer

    def __enter__(self) -> SpikePacker:
        self.packer.enter()
        return self.packer

    def __exit__(self, *exc: Any) -> None:
        self.packer.exit()
