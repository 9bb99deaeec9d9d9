"""Measuring the memory autograd keeps for backward, the same way on every device: the bytes of the
distinct storages saved while a forward runs (``torch.autograd.graph.saved_tensors_hooks``). Used by
:func:`snn_localrules.diagnose` and by online SLTT's ``chunk="auto"``."""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple, Union

import torch


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while active, leaving out
    the storages in ``exclude`` (parameters, buffers, the input: they exist whatever the rule).

    ``packer``: the :class:`~snn_localrules.functional.spike_pack.SpikePacker` of a wrapped model, if it has
    one: then what it keeps is counted (spikes as 1-byte counts) through the packer's observer, instead of
    by hooks of this object's own, under which the packer would stand aside."""

    #: its pack hook returns every tensor unchanged: the fused neuron may rely on what it saves as without it
    keeps_saved_tensors_as_they_are = True

    def __init__(self, exclude: set, packer: Any = None):
        self.exclude = exclude
        self.storages: Dict[Tuple[str, int], int] = {}
        self.packer = packer
        self._observing = False

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            # a saved storage stays alive in the graph while counting, so its address is not reused
            if key[1] and key not in self.exclude:
                self.storages[key] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedBytes":
        from .functional.spike_pack import can_push

        # the packer pushes its hooks when the model's forward starts, if it could now
        if self.packer is not None and self.packer.observer is None and can_push():
            self.packer.observer, self._observing = self.pack, True
            return self
        self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._observing:
            self.packer.observer, self._observing = None, False
            return
        self._context.__exit__(*exc)


def storage_keys(tensors: Sequence[torch.Tensor]) -> set:
    return {(str(t.device), t.untyped_storage().data_ptr()) for t in tensors if t.device.type != "meta"}


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's on CUDA, the machine's physical memory otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import os

    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_budget(max_memory: Union[int, float], device: torch.device) -> float:
    """Bytes of a budget given as bytes (int) or as a fraction (float in (0, 1]) of the device's memory."""
    if isinstance(max_memory, float):
        return max_memory * device_memory(device)
    return float(max_memory)
