"""A CPU stand-in for ``torch.cuda.CUDAGraph``, with the semantics that matter to code that uses graphs.

Capture records every aten op (forward and backward) with the tensors it read and wrote. Like a CUDA
capture, it leaves no trace: memory that existed before and was written during the capture gets its old
bytes back, memory made during the capture is left as garbage (all bits set: NaN in floating point). A
replay runs the recorded ops again on the same tensors: out-of-place results are copied into the tensors
the capture returned, in-place ops write the same tensors again, views are not re-run (they alias memory
that is rewritten anyway). No Python between the ops runs on replay. A host synchronisation during the
capture (``.item()``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing) raises, as it does on a
capturing CUDA stream.

So a test can check the plumbing of :mod:`snn_localrules.graphs` (static buffers, state copied in and
out, gradients accumulated in place, outputs read before the next replay) on CPU. What it cannot check:
stream rules, memory pools, and kernels launched outside torch (CuPy), which the GPU tests cover.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that wait for the device (a value or a data-dependent shape comes back to the host): not allowed
# while a CUDA stream is capturing
SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
         torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
         torch.ops.aten.unique_consecutive.default, torch.ops.aten.unique_dim.default}


# ops that write arguments their schema does not mark as written: batch norm's running statistics
HIDDEN_WRITES = {torch.ops.aten.native_batch_norm.default: ("running_mean", "running_var")}


def _written(func: Any, args: tuple, kwargs: dict) -> List[torch.Tensor]:
    out = []
    schema = func._schema
    for index, arg in enumerate(schema.arguments):
        if arg.name in HIDDEN_WRITES.get(func, ()):
            value = kwargs[arg.name] if arg.name in kwargs else args[index]
            if isinstance(value, torch.Tensor):
                out.append(value)
    for index, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = kwargs[arg.name] if arg.name in kwargs else (args[index] if index < len(args) else None)
        out.extend(t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
    return out


def _aliases_input(func: Any) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "EmulatedGraph"):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise RuntimeError("operation not permitted when stream is capturing (emulated)")
        written = _written(func, args, kwargs)
        for tensor in written:
            self.graph._remember(tensor)
        result = func(*args, **kwargs)
        if written and func in HIDDEN_WRITES:
            kind = "compute"  # it returns fresh outputs as well as writing in place
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.graph._made[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        elif written:
            kind = "inplace"
        elif _aliases_input(func):
            kind = "view"
        else:
            kind = "compute"
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.graph._made[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        self.graph.ops.append((func, args, kwargs, result, kind))
        return result


class EmulatedGraph:
    """Drop-in for the object :func:`snn_localrules.graphs.new_graph` returns."""

    #: every graph made while a test runs, to count captures and replays
    made: List["EmulatedGraph"] = []

    def __init__(self, pool: Any = None):
        self.ops: List[Tuple[Any, tuple, dict, Any, str]] = []
        self._made: Dict[int, torch.UntypedStorage] = {}
        self._before: Dict[int, Tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        self.replays = 0
        EmulatedGraph.made.append(self)

    def _remember(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._made and key not in self._before:
            self._before[key] = (storage, storage.clone())

    @contextlib.contextmanager
    def capture(self):
        with _Recorder(self):
            yield
        for storage, old in self._before.values():
            storage.copy_(old)  # a capture runs no kernel: memory from before keeps its bytes
        for storage in self._made.values():
            if storage.nbytes():
                torch.tensor([], dtype=torch.uint8).set_(storage).fill_(255)  # fresh memory holds garbage
        self._before.clear()

    def replay(self) -> None:
        self.replays += 1
        with torch._C._AutoDispatchBelowADInplaceOrView():  # kernels only, as a CUDA replay: no autograd
            for func, args, kwargs, result, kind in self.ops:
                if kind == "view":
                    continue
                again = func(*args, **kwargs)
                if kind == "compute":
                    for old, new in zip(tree_flatten(result)[0], tree_flatten(again)[0]):
                        if isinstance(old, torch.Tensor):
                            old.copy_(new)


def require_emulator() -> None:
    """Skip the calling test where this torch cannot replay kernels without autograd (torch 2.1)."""
    if not hasattr(torch._C, "_AutoDispatchBelowADInplaceOrView"):
        import pytest

        pytest.skip("the CUDA-graph emulator needs torch._C._AutoDispatchBelowADInplaceOrView (torch 2.1 lacks it)")


def emulate(monkeypatch) -> List[EmulatedGraph]:
    """Route :mod:`snn_localrules.graphs` to the emulator for CPU tensors; returns the list of graphs."""
    from snn_localrules import graphs

    require_emulator()

    EmulatedGraph.made = []
    monkeypatch.setattr(graphs, "runs_on", lambda device: True)
    monkeypatch.setattr(graphs, "new_pool", lambda: None)
    monkeypatch.setattr(graphs, "new_graph", EmulatedGraph)
    return EmulatedGraph.made
