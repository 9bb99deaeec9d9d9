"""CUDA graphs of the online learner's backpropagated steps.

An online SLTT step (or chunk of ``c`` steps) on a GPU is a few hundred small kernels: forward, the step's
loss, its backward into the parameters' ``.grad``. At batch 32 launching them costs more than running them.
A CUDA graph records the kernels once and replays them with one launch. Replay runs no Python, so
everything a step touches must stay at fixed addresses:

* the step's input and labels are copied into static buffers;
* the carried state (every neuron's membrane, and state that other modules carry from step to step, e.g.
  SpikingJelly's ``layer.Dropout`` mask) is read from static buffers; the graph ends by copying the new
  state into them, and the modules are pointed at them after each replay. A state that is a number (a
  SpikingJelly neuron after ``reset``) is filled in, which is what the framework does with it;
* the parameters' gradients are accumulated in place into ``.grad`` tensors that exist before the capture
  (so the first steps of the first batch run eagerly: they allocate them and warm up the libraries), and
  at the start of a batch they are zeroed in place, never set to ``None``.

The outputs and the loss of a replay live in the graph's memory and are consumed before the next replay.
A step whose input, labels, state or parameters do not match a captured graph runs eagerly (and is
captured after ``warmup`` such steps); a model that cannot be captured (host synchronisation in its
forward, a CPU tensor, a kernel outside the capturing stream) runs eagerly from then on, and the learner
says why once. The capture itself runs no kernel: the step is then replayed.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

Body = Callable[[torch.Tensor, torch.Tensor], Tuple[List[torch.Tensor], torch.Tensor]]


def runs_on(device: torch.device) -> bool:
    """Whether steps on ``device`` can be captured (CUDA tensors with a working CUDA runtime)."""
    return device.type == "cuda" and torch.cuda.is_available()


class _CudaGraph:
    def __init__(self, pool: Any):
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self):
        return torch.cuda.graph(self._graph, pool=self._pool)

    def replay(self) -> None:
        self._graph.replay()


def new_pool() -> Any:
    """One memory pool shared by a learner's graphs (their replays never overlap)."""
    return torch.cuda.graph_pool_handle()


def new_graph(pool: Any) -> Any:
    """An object with ``capture()`` (a context) and ``replay()``."""
    return _CudaGraph(pool)


@contextlib.contextmanager
def on_side_stream(side: Optional[Any], device: torch.device) -> Iterator[None]:
    """Run the block on the stream ``side`` (warm-up steps, as torch's notes on capture ask: lazy
    initialisation of cuBLAS/cuDNN work happens there, not in a capture), ordered after and before the
    current stream's work; ``None``: on the current stream."""
    if side is None:
        yield
        return
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, static: Any) -> bool:
    """Whether a state value is of the kind its static entry holds: None for None (a mask never made), the
    same number for a constant (legacy SpikingJelly keeps ``v_threshold`` among its memories), a tensor of
    the same shape, dtype and device for a buffer."""
    if isinstance(static, torch.Tensor):
        return (isinstance(value, torch.Tensor) and value.shape == static.shape and value.dtype == static.dtype
                and value.device == static.device)
    if static is None:
        return value is None
    return _number(value) and value == static


class _Captured:
    """One captured step: its graph, static input/labels, static state, outputs."""

    def __init__(self, graph: Any, x: torch.Tensor, y: torch.Tensor, states: List[Dict[str, Any]],
                 outs: List[torch.Tensor], loss: torch.Tensor):
        self.graph, self.x, self.y, self.states, self.outs, self.loss = graph, x, y, states, outs, loss

    @torch.no_grad()
    def load(self, holders: Sequence[Any]) -> bool:
        """Copy the holders' current state into the static buffers; False if it does not fit them."""
        for holder, static in zip(holders, self.states):
            current = holder.get_state()
            if current.keys() != static.keys():
                return False
            for name, buffer in static.items():
                value = current[name]
                if value is buffer:
                    continue  # left there by the previous replay
                if isinstance(buffer, torch.Tensor) and _number(value):
                    buffer.fill_(value)  # a state reset to a number
                elif not _fits(value, buffer):
                    return False
                elif isinstance(buffer, torch.Tensor):
                    buffer.copy_(value)
        return True


class StepGraphs:
    """The CUDA graphs of one online learner.

    :param holders: the objects whose ``get_state()``/``set_state()`` give the state carried from step to
        step (the neuron adapters, and what plugins report through ``slr_carried_state``).
    :param warmup: eager steps of a kind before it is captured.
    """

    def __init__(self, holders: Sequence[Any], warmup: int = 2):
        self.holders = list(holders)
        self.warmup = warmup
        #: why steps are not captured (``None`` while they may be); said once, by a warning
        self.off: Optional[str] = None
        self._captured: Dict[tuple, _Captured] = {}
        self._seen: Dict[tuple, int] = {}
        self._grads: Optional[Dict[nn.Parameter, torch.Tensor]] = None
        self._params: Optional[tuple] = None
        self._pool: Any = None
        self._fresh = True  # no eager step has run since the batch started
        self._side: Optional[Any] = None

    @property
    def captured(self) -> int:
        """How many step shapes are captured."""
        return len(self._captured)

    def clear(self) -> None:
        """Drop every graph and its memory (e.g. when the learner is unwrapped)."""
        self._captured.clear()
        self._seen.clear()
        self._grads = None
        self._pool = None

    def turn_off(self, reason: str) -> None:
        if self.off is None:
            self.off = reason
            self.clear()
            self._params = None
            warnings.warn(f"CUDA graphs are off for this learner: {reason}. Online steps run eagerly.",
                          RuntimeWarning, stacklevel=3)

    def start_batch(self, params: Sequence[nn.Parameter]) -> None:
        """Call after the optimizer's ``zero_grad()``: zero the gradients the graphs accumulate into, in
        place, and give them back to their parameters (``zero_grad()`` may have set them to ``None``). A
        parameter replaced or (un)frozen since the capture makes the graphs stale: they are dropped."""
        self._fresh = True
        signature = tuple((id(p), p.requires_grad) for p in params)
        if signature != self._params:
            self.clear()
            self._params = signature
        if self._grads is None:
            return
        grads = []
        for param in params:
            grad = self._grads.get(param)
            if grad is not None:
                param.grad = grad
                grads.append(grad)
        if grads:
            torch._foreach_zero_(grads)

    def run(self, body: Body, x: torch.Tensor, y: torch.Tensor, key: tuple,
            params: Sequence[nn.Parameter]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """One backpropagated step (or chunk): ``body(x, y)`` eagerly, or the replay of its graph.

        :param body: forward, loss and backward of the step; returns (per-step outputs, loss).
        :param key: what else the graph depends on (T, train/eval, autocast, ...).
        :param params: every parameter of the model.
        """
        if self.off is not None:
            return body(x, y)
        key = (tuple(x.shape), x.dtype, x.device, tuple(y.shape), y.dtype, *key)
        entry = self._captured.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            # a capture needs the .grad tensors it accumulates into: an eager step of this batch made them
            if seen < self.warmup or self._fresh or not self._capturable():
                self._seen[key] = seen + 1
                self._fresh = False
                if self._side is None and x.device.type == "cuda":
                    self._side = torch.cuda.Stream(x.device)  # one, so that its memory is reused safely
                with on_side_stream(self._side, x.device):
                    return body(x, y)
            entry = self._capture(body, x, y, params)
            if entry is None:
                return body(x, y)
            self._captured[key] = entry
        elif not self._grads_attached() or not entry.load(self.holders):
            self._fresh = False
            return body(x, y)
        entry.x.copy_(x)
        entry.y.copy_(y)
        entry.graph.replay()
        for holder, static in zip(self.holders, entry.states):
            holder.set_state(static)
        return entry.outs, entry.loss

    def _capturable(self) -> bool:
        # tensors, numbers that are constants (legacy SpikingJelly keeps v_threshold among its memories)
        # and None; a run() captures only after an eager step of the same batch, so a state that is a
        # number after reset (SpikingJelly's v) is a tensor by then
        return all(isinstance(v, torch.Tensor) or v is None or _number(v)
                   for h in self.holders for v in h.get_state().values())

    def _grads_attached(self) -> bool:
        return self._grads is None or all(p.grad is g for p, g in self._grads.items())

    def _capture(self, body: Body, x: torch.Tensor, y: torch.Tensor,
                 params: Sequence[nn.Parameter]) -> Optional[_Captured]:
        if self._grads is not None and not self._grads_attached():
            return None  # a capture must accumulate into the same tensors as the others
        grads = {p: p.grad for p in params if p.grad is not None}
        before = [h.get_state() for h in self.holders]
        states = [{n: v.detach().clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                  for s in before]
        static_x, static_y = x.clone(), y.clone()
        if self._pool is None:
            self._pool = new_pool()
        graph = new_graph(self._pool)
        for holder, static in zip(self.holders, states):
            holder.set_state(static)
        try:
            with graph.capture():
                outs, loss = body(static_x, static_y)
                with torch.no_grad():
                    for holder, static in zip(self.holders, states):
                        after = holder.get_state()
                        for name, buffer in static.items():
                            value = after.get(name)
                            if not _fits(value, buffer):
                                raise _NotCapturable(
                                    f"{type(getattr(holder, 'module', holder)).__name__} leaves its state "
                                    f"{name!r} as {_describe(value)} after a step (it entered as {_describe(buffer)})"
                                )
                            if isinstance(buffer, torch.Tensor):
                                buffer.copy_(value)
        except Exception as error:  # the capture ran no kernel: put things back and go on eagerly
            self._undo(params, grads, before)
            reason = str(error) if isinstance(error, _NotCapturable) else (
                f"the step could not be captured ({type(error).__name__}: {_first_line(error)}); a host "
                "synchronisation (.item(), a Python if on a tensor value, printing a tensor) or a kernel "
                "launched outside torch's current stream in the model's forward or loss prevents it")
            self.turn_off(reason)
            return None
        new = [p for p in params if p.grad is not None and grads.get(p) is not p.grad]
        if new:
            # a gradient made during the capture lives in the graph's memory and is overwritten, not
            # accumulated, by each replay: warm-up steps must have made every gradient first
            self._undo(params, grads, before)
            self.turn_off(f"{len(new)} parameter(s) got their first gradient inside the capture")
            return None
        if self._grads is None:
            self._grads = grads
        return _Captured(graph, static_x, static_y, states, list(outs), loss)

    def _undo(self, params: Sequence[nn.Parameter], grads: Dict[nn.Parameter, torch.Tensor],
              states: List[Dict[str, Any]]) -> None:
        """After a failed capture: the gradients and the carried state from before it."""
        for param in params:
            param.grad = grads.get(param)
        for holder, state in zip(self.holders, states):
            holder.set_state(state)


class _NotCapturable(RuntimeError):
    pass


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor {tuple(value.shape)}"
    return type(value).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
