"""Spikes saved for backward are stored as one byte per value instead of four (or two), exactly.

Autograd keeps the input of every layer for its backward: the conv or linear after a neuron layer saves
that layer's spikes, a ``[T, B, ...]`` float tensor of zeros and ones. This module packs such a tensor
into ``torch.bool`` when autograd saves it and unpacks it to the original dtype when backward needs it:
the same values bit for bit, so gradients are unchanged, and the saved copy takes a quarter of the
memory (fp32).

Only tensors *known* to be binary are packed: outputs the fused SLTT neuron registered with
:meth:`SpikePacker.register` (its forward is a Heaviside, so its outputs are exactly 0 or 1). A
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


def _other_hooks_active() -> bool:
    """Whether saved-tensor hooks (someone else's) are active now. Unknown (an old torch without the
    query): assume they are, and do not pack."""
    top: Optional[Callable] = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    return top(False) is not None


class _Packed:
    """A spike tensor as autograd keeps it: bool values and the dtype to restore."""

    __slots__ = ("bits", "dtype")

    def __init__(self, bits: torch.Tensor, dtype: torch.dtype):
        self.bits = bits
        self.dtype = dtype


class SpikePacker:
    """Saved-tensor hooks that store registered spike tensors as ``bool``.

    Use :meth:`activate` around a forward (re-entrant: nested activations count) and :meth:`register`
    on each binary tensor the forward makes. ``packed_bytes`` / ``saved_bytes`` count what was packed
    and what it would have cost, for tests and benchmarks.
    """

    def __init__(self) -> None:
        self._spikes: Dict[int, Tuple[weakref.ref, int]] = {}  # storage address -> (tensor, version)
        self._depth = 0
        self._pushed = False
        self.packed_bytes = 0
        self.saved_bytes = 0

    # -- registration ------------------------------------------------------------------------------
    def register(self, spikes: torch.Tensor) -> None:
        """Declare ``spikes`` binary (exactly 0 or 1). Only while active; other dtypes are ignored."""
        if not self._pushed or not isinstance(spikes, torch.Tensor) or spikes.dtype not in _PACKED_DTYPES:
            return
        address = spikes.untyped_storage().data_ptr()
        if address:
            self._spikes[address] = (weakref.ref(spikes), spikes._version)

    def _is_spikes(self, tensor: torch.Tensor) -> bool:
        if tensor.dtype not in _PACKED_DTYPES or tensor.layout != torch.strided:
            return False
        entry = self._spikes.get(tensor.untyped_storage().data_ptr())
        if entry is None:
            return False
        ref, version = entry
        owner = ref()
        # alive: its storage cannot have been reused by another tensor; same version: not modified since
        return owner is not None and owner._version == version and tensor._version == version

    # -- the hooks ---------------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self._is_spikes(tensor):
            return tensor
        bits = tensor.detach().to(torch.bool)
        self.packed_bytes += bits.numel() * bits.element_size()
        self.saved_bytes += tensor.numel() * tensor.element_size()
        return _Packed(bits, tensor.dtype)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, _Packed):
            return saved.bits.to(saved.dtype)
        return saved

    # -- activation --------------------------------------------------------------------------------
    def enter(self) -> None:
        """Start packing (outermost call), unless other saved-tensor hooks are active or torch is
        compiling a graph. Pair every ``enter`` with an :meth:`exit`."""
        self._depth += 1
        if self._depth > 1:
            return
        compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
        if compiling or _other_hooks_active():
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
