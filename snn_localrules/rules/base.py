"""The common base of learning rules: what a learner holds, how it is installed and removed, and the
pieces every online driver shares (input checks, choosing the output, stepping a model in time)."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import distributed
from ..adapter import NeuronAdapter
from ..errors import LayoutError, NonFiniteLossError, OnlineLossWarning, UnsupportedModelError, WrapError
from ..plugins import plugin_manager
from ..wrap import ModuleHooks, _forget, _remember, neuron_change_error, new_carried, unknown_modules

OutputChoice = Union[int, Callable[[Any], torch.Tensor], None]


class Rule:
    """A learning rule bound to one model. Built by :func:`snn_localrules.wrap`, never directly.

    Subclasses validate their options in ``__init__`` without touching the model, change the model only
    in :meth:`install` through the :class:`~snn_localrules.wrap.ModuleHooks` they are given, and may add
    a driver (``step``) for online training.

    :param model: the user's model.
    :param neurons: the adapters of its neuron modules, found at wrap time.
    """

    #: the name the rule is registered under
    name: str = ""

    #: online rules: ``True``/``False`` forces how the model is fed (``multi_step=``); ``None``: found out
    multi_step: Optional[bool] = None

    def __init__(self, model: nn.Module, neurons: Sequence[NeuronAdapter]):
        self.model = model
        self.neurons: List[NeuronAdapter] = list(neurons)
        self._hooks = ModuleHooks()
        self._wrapped = False
        self._takes_sequences: Optional[bool] = None

    def _sequence_model(self) -> bool:
        """Whether the model is fed ``[c, B, ...]`` per call (a multi-step model) rather than one step
        ``[B, ...]``: ``multi_step=`` if given, else whether a neuron runs multi-step now or a plugin
        says the model takes sequences (single-step neurons inside SpikingJelly's ``MultiStepContainer``)."""
        if self.multi_step is not None:
            return self.multi_step
        if any(n.multi_step for n in self.neurons):
            return True
        return self._model_takes_sequences()

    def _model_takes_sequences(self) -> bool:
        if self._takes_sequences is None:  # the model's structure: asked once
            answer = plugin_manager().hook.slr_takes_sequences(model=self.model, neurons=self.neurons)
            self._takes_sequences = bool(answer)
        return self._takes_sequences

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Rule":
        """A copy that drives its own copy of the model (a fork of a training run), recorded as that
        copy's learner, as :func:`snn_localrules.wrap` records the original (``slr.learner_of``, ``unwrap``)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        if new._wrapped:
            _remember(new.model, new)
        return new

    # -- install / remove ------------------------------------------------------------------------
    def install(self, hooks: ModuleHooks) -> None:
        """Put the rule's hooks on the model (subclasses)."""

    def _install(self) -> None:
        self.install(self._hooks)
        # under DDP each process keeps its own neuron state (snnTorch's are buffers, which DDP would copy
        # from rank 0 at every forward)
        self._ddp_local_state = distributed.keep_neuron_state_local(self.model, self.neurons)
        self._structure = set(self.model.modules())  # what _check_structure compares with
        self._wrapped = True

    def _check_structure(self) -> None:
        """The model holds the neurons found at wrap time and nothing else the learner would have to drive
        (:func:`~snn_localrules.wrap.unknown_modules`: a neuron, and for online learners a stateful layer or
        one that needs whole sequences). torch's registration hook refuses such a module set into a wrapped
        model (``wrap.py``); this finds the ways around it (``Sequential.insert``, a neuron taken out), once
        per batch: such a module would keep its time route, fail in a freed graph, or not run at all."""
        present = set(self.model.modules())
        if present == self._structure:
            return
        removed = [n for n in self.neurons if n.module not in present]
        added = [(name or "<model>", m, kind) for name, m, kind in unknown_modules(self, self.model)
                 if m not in self._structure]
        if added or removed:
            raise neuron_change_error(self.model, self, added, removed)
        holders = new_carried(self, self.model)
        if holders:
            self._adopt_carried(holders)
        self._structure = present  # a new head, a parametrization, a stateful layer taken on

    def _remove(self) -> None:
        self._hooks.remove()
        distributed.release_neuron_state(self.model, self.__dict__.pop("_ddp_local_state", ()))

    @property
    def wrapped(self) -> bool:
        """False once :meth:`unwrap` has run."""
        return self._wrapped

    def unwrap(self) -> nn.Module:
        """Remove every hook this learner installed and give the model back as it was.

        Calling it again is a no-op, so it is safe in a ``finally:``.
        """
        if getattr(self, "_stepping", False):
            raise WrapError(
                f"unwrap() was called while this {self.name} learner's step() is running (from inside the "
                "model's forward or a hook?); the batch would run half wrapped. Unwrap after step() returns."
            )
        if self._wrapped:
            self._remove()
            self._wrapped = False
            _forget(self.model)
        return self.model

    def _check_wrapped(self) -> None:
        if not self._wrapped:
            raise WrapError(
                f"this {self.name} learner was unwrapped; wrap the model again with slr.wrap(model, ...)."
            )

    # -- state -----------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Reset every neuron of the model, and the framework state of other modules (dropout masks)."""
        for neuron in self.neurons:
            neuron.reset_state()
        plugin_manager().hook.slr_reset_model(model=self.model, neurons=self.neurons)

    def state_dict(self) -> Dict[str, Any]:
        """The learner's own state (rule name and options, generators, the optimizer and scaler it drives;
        subclasses add theirs), not the model's: :meth:`save` stores both."""
        return {"rule": self.name}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take back a :meth:`state_dict` of a learner of the same rule (a ``ValueError`` otherwise)."""
        if not self._own_rule(state.get("rule")):
            raise ValueError(f"state_dict is for rule {state.get('rule')!r}, this learner is {self.name!r}")

    def _own_rule(self, rule: Any) -> bool:
        """A state of this learner's rule: its name, or, for a rule class registered under a name of its
        own, the name its class carries (what such a learner called itself before learners took the name
        they are wrapped by)."""
        return rule == self.name or rule == type(self).name

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Union[str, "os.PathLike[str]"], **extra: Any) -> None:
        """Write everything a resumed run needs to ``path``: the model's ``state_dict``, the learner's
        (rule options, SLTT-K generator, TP projection, the optimizer and scaler it drives), torch's
        global random states, and ``extra`` (epoch, batch index, ...). Written to a temporary file and
        renamed into place, so a crash while saving never leaves a corrupt checkpoint.

        The order of your data is yours to restore (e.g. a ``DataLoader`` generator or
        ``DistributedSampler.set_epoch``). Resuming on CPU reproduces an uninterrupted run bit for bit.
        """
        from ..checkpoint import atomic_save, rng_state

        atomic_save({"model": self.model.state_dict(), "learner": self.state_dict(), "rng": rng_state(),
                     "extra": extra}, path)

    def load(self, path: Union[str, "os.PathLike[str]"], map_location: Any = None,
             restore_rng: bool = True) -> Dict[str, Any]:
        """Restore a checkpoint written by :meth:`save` into this learner, its model and optimizer.

        :param map_location: as for ``torch.load`` (e.g. ``"cpu"``).
        :param restore_rng: also restore torch's global random states (default True).
        :return: the ``extra`` values given to :meth:`save`.
        """
        from ..checkpoint import set_rng_state

        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(checkpoint, dict) or not {"model", "learner"} <= set(checkpoint):
            raise ValueError(f"{path} is not a checkpoint written by learner.save() (no model/learner entries).")
        if not self._own_rule(checkpoint["learner"].get("rule")):
            self.load_state_dict(checkpoint["learner"])  # raises, naming both rules
        # all or nothing: model.load_state_dict copies what fits before it raises, and the optimizer's state
        # would otherwise already be the checkpoint's (for a model of another shape: the next step crashes)
        model_before = copy.deepcopy(self.model.state_dict())
        learner_before = copy.deepcopy(self.state_dict())
        try:
            self.model.load_state_dict(checkpoint["model"])  # torch's own rules (its load hooks included)
            self.load_state_dict(checkpoint["learner"])
        except BaseException:
            self.model.load_state_dict(model_before)
            self.load_state_dict(learner_before)
            raise
        if restore_rng:
            set_rng_state(checkpoint.get("rng"))
        return dict(checkpoint.get("extra") or {})

    def __repr__(self) -> str:
        listed = ", ".join(n.describe() for n in self.neurons[:4])
        more = f", ... ({len(self.neurons)} in all)" if len(self.neurons) > 4 else ""
        return f"{type(self).__name__}(neurons=[{listed}{more}], wrapped={self._wrapped})"


class DrivesOptimizer:
    """For a rule that steps the user's optimizer itself (SLTT, TP): ``learner.optimizer`` may be replaced
    by another (checked as ``wrap`` checks it), not added or taken away. Mixed in before :class:`Rule`."""

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer the learner steps (None in zero-change mode). Assigning another one (a new
        optimizer for a fine-tuning phase) checks it as ``wrap`` does; it cannot switch zero-change
        mode on or off (unwrap and wrap again for that)."""
        return self.__dict__.get("_optimizer")

    @optimizer.setter
    def optimizer(self, value: Optional[torch.optim.Optimizer]) -> None:
        if "_optimizer" in self.__dict__ and (value is None) != (self._optimizer is None):
            raise WrapError(
                "a learner's optimizer can be replaced by another, but not added or taken away: that would "
                "switch between online and zero-change mode. Call learner.unwrap() and wrap the model again "
                "with (or without) optimizer=."
            )
        if value is not None:
            check_optimizer(value, self.model)
        self.__dict__["_optimizer"] = value


def model_parameters_in(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """How many of the model's parameters the optimizer holds."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return sum(1 for p in model.parameters() if id(p) in held)


def check_optimizer(optimizer: Any, model: nn.Module) -> None:
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
        raise WrapError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            "pass e.g. optimizer=torch.optim.Adam(model.parameters())."
        )
    if model_parameters_in(optimizer, model) == 0:
        raise WrapError(
            "the optimizer holds none of the model's parameters, so training would change nothing; "
            "build it from this model: torch.optim.Adam(model.parameters(), ...)."
        )
    if _step_needs_closure(optimizer):
        raise WrapError(
            f"{type(optimizer).__name__}.step() needs a closure that evaluates the loss again, and the learner "
            "steps the optimizer itself, without one. Use an optimizer whose step() needs none (SGD, Adam, ...), "
            f"or keep {type(optimizer).__name__} in zero-change mode: slr.wrap(model, rule='sltt') without an "
            "optimizer, and your own loop with its closure."
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(p.requires_grad for p in model.parameters() if id(p) in held):
        raise WrapError(
            "every model parameter the optimizer holds has requires_grad=False (frozen), so training would "
            "change nothing; unfreeze some (p.requires_grad_(True)) or give the optimizer trainable ones."
        )


def _step_needs_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` has a ``closure`` argument without a default (``torch.optim.LBFGS``)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def check_precision(autocast: Any, scaler: Any, online: bool) -> None:
    """Validate the ``autocast=`` and ``scaler=`` options shared by the online drivers."""
    if not (autocast is None or isinstance(autocast, (bool, torch.dtype))):
        raise WrapError(f"autocast must be None, True/False or a dtype such as torch.bfloat16, got {autocast!r}.")
    if scaler is not None:
        if not online:
            raise WrapError("scaler needs online mode (pass optimizer=...); in zero-change mode use it in your own loop.")
        if not all(callable(getattr(scaler, name, None)) for name in ("scale", "step", "update", "get_scale")):
            raise WrapError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}.")


def check_clip_grad_norm(clip_grad_norm: Any, online: bool) -> None:
    """Validate the ``clip_grad_norm=`` option shared by the online drivers."""
    if clip_grad_norm is None:
        return
    if not online:
        raise WrapError(
            "clip_grad_norm= clips before the learner's own optimizer step, so it needs online mode "
            "(optimizer=...); in zero-change mode clip in your loop (torch.nn.utils.clip_grad_norm_)."
        )
    number = isinstance(clip_grad_norm, (int, float)) and not isinstance(clip_grad_norm, bool)
    if not number or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0:
        raise WrapError(
            f"clip_grad_norm must be a positive number (the largest total 2-norm of the gradients), got "
            f"{clip_grad_norm!r}."
        )


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Any, clip_grad_norm: Optional[float]) -> bool:
    """The learner's optimizer step, with ``scaler`` (a ``GradScaler``: unscale, step or skip on inf/NaN,
    update) and gradient clipping (the total 2-norm of the optimizer's gradients at most ``clip_grad_norm``,
    after unscaling, as ``torch.nn.utils.clip_grad_norm_`` does in a plain loop). Returns whether the
    scaler skipped the step."""
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is None:
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def check_chunk(chunk: Any, max_memory: Any, online: bool) -> None:
    """Validate online SLTT's ``chunk=`` and ``max_memory=`` options."""
    if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise WrapError(f"chunk must be a positive int (steps per backward) or 'auto', got {chunk!r}.")
    if chunk != 1 and not online:
        raise WrapError("chunk= sets how online mode groups its steps; it needs optimizer=... (online mode).")
    if chunk == "auto":
        if max_memory is None:
            raise WrapError("chunk='auto' needs max_memory=: a budget in bytes, or a fraction of the device's memory.")
        if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or max_memory <= 0:
            raise WrapError(f"max_memory must be bytes (a positive int) or a fraction in (0, 1], got {max_memory!r}.")
        if isinstance(max_memory, float) and max_memory > 1:
            raise WrapError(f"max_memory={max_memory!r}: a float is a fraction of the device's memory, in (0, 1]; "
                            "give bytes as an int.")
    elif max_memory is not None:
        raise WrapError("max_memory= is the budget of chunk='auto'; pass chunk='auto' too, or drop max_memory.")


@contextlib.contextmanager
def _without_autocast_cache() -> Iterator[None]:
    was = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(was)


def autocast_context(autocast: Union[None, bool, torch.dtype], device_type: str):
    """``torch.autocast`` for the learner's ``autocast=`` option; when it is off, the caller's own autocast
    (if any) as it is. Both without autocast's cache of weight casts, which keeps the low-precision copy
    of a weight made at its first use in a region: TP steps the optimizer inside a step, and a user's
    autocast block may hold several ``step()`` calls, so a cached copy would be stale after the first
    update; torch 2.6 also reuses a copy made under ``no_grad``, which has no graph to the weight; and a
    CUDA graph must cast at every replay, not reuse a cast made at capture. A step casts each weight once
    anyway."""
    if not autocast:
        return _without_autocast_cache()
    return torch.autocast(device_type=device_type, dtype=None if autocast is True else autocast,
                          cache_enabled=False)


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type``, the caller's own block too; a no-op where this
    torch's autocast does not know the device type (torch 2.1 and Apple's ``mps``): nothing to turn off."""
    try:
        return torch.autocast(device_type, enabled=False)
    except (RuntimeError, AttributeError):
        return contextlib.nullcontext()


def backward(loss: torch.Tensor, scaler: Any) -> None:
    """``loss.backward()``, scaled by ``scaler`` when there is one, outside autocast, the caller's own block
    too: autocast is for forwards, and a backward inside the caller's block gave other gradients than the
    same backward outside it (TP with SpikingJelly 0.0.0.0.14: 0.15 apart after three batches, against
    0.0 outside), so a block around ``step()`` would not train as ``autocast=`` does."""
    with autocast_off(loss.device.type):
        (scaler.scale(loss) if scaler is not None else loss).backward()


def check_sequence_batch(x_seq: Any, y: Optional[torch.Tensor] = None, T: Optional[int] = None) -> int:
    """Check that ``x_seq`` is time-first ``[T, B, ...]`` (and matches ``y`` ``[B]``); return T."""
    if not isinstance(x_seq, torch.Tensor):
        raise LayoutError(f"x_seq must be a tensor [T, B, ...], got {type(x_seq).__name__}.")
    if x_seq.dim() < 2:
        raise LayoutError(
            f"x_seq has shape {tuple(x_seq.shape)}; it must be time-first [T, B, ...]. For a static input "
            "repeat it over time: x.unsqueeze(0).repeat(T, *[1] * x.dim())."
        )
    steps, batch = x_seq.shape[0], x_seq.shape[1]
    if steps == 0 or batch == 0:
        raise LayoutError(f"x_seq has shape {tuple(x_seq.shape)}: it holds no time step or no sample.")
    if not x_seq.is_floating_point():
        raise LayoutError(
            f"x_seq has dtype {x_seq.dtype}; spiking models take floating-point inputs (spikes as 0./1.): "
            "pass x_seq.float()."
        )
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise LayoutError(f"y must be a tensor of class indices [B], got {type(y).__name__}.")
        if y.dim() != 1 or y.dtype.is_floating_point:
            raise LayoutError(
                f"y must hold class indices, shape [B] and an integer dtype; got shape {tuple(y.shape)}, "
                f"dtype {y.dtype}. For one-hot targets pass y.argmax(-1)."
            )
        if y.dtype != torch.long:
            # cross-entropy and one-hot take int64 indices only; a bool y is usually a mask passed by mistake
            raise LayoutError(f"y has dtype {y.dtype}; class indices must be torch.long (int64): pass y.long().")
        if y.shape[0] != batch:
            if steps == y.shape[0]:
                raise LayoutError(
                    f"x_seq has shape {tuple(x_seq.shape)} but y has {y.shape[0]} labels: x_seq looks "
                    "batch-first [B, T, ...] (pass x_seq.transpose(0, 1)) or has no time dimension "
                    "(repeat it over time: x.unsqueeze(0).repeat(T, ...))."
                )
            raise LayoutError(
                f"batch size mismatch: x_seq [T, B, ...] = {tuple(x_seq.shape)} has B={batch} but y has "
                f"{y.shape[0]} labels."
            )
    if T is not None and steps != T:
        raise LayoutError(
            f"x_seq has T={steps} time steps but this learner was set up with T={T}; pass sequences of "
            f"{T} steps or wrap with T=None."
        )
    return steps


def choose_output(output: Any, choice: OutputChoice) -> torch.Tensor:
    """Pick the tensor the loss is computed on from a model output.

    A tensor is used as it is. From a tuple or list (snnTorch's ``(spk, mem)``), element ``choice`` is
    taken (default 0, the spikes); ``choice`` may also be a callable ``output -> tensor``.
    """
    if callable(choice):
        return choice(output)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        index = 0 if choice is None else choice
        if not -len(output) <= index < len(output):
            raise LayoutError(
                f"the model returns {len(output)} outputs but output={index} was asked for; pass "
                f"output=<index> or output=<callable> to wrap()."
            )
        return output[index]
    raise LayoutError(
        f"the model returned {type(output).__name__}; pass output=<callable> to wrap() to say which tensor "
        "the loss uses."
    )


def run_in_time(
    model: nn.Module, chunk: torch.Tensor, sequence_model: bool, choice: OutputChoice,
    one_call_per_step: bool = False,
) -> List[torch.Tensor]:
    """Run ``model`` over ``chunk`` ``[c, B, ...]`` and return the ``c`` per-step outputs ``[B, ...]``.

    A sequence (multi-step) model gets the chunk in one call, or with ``one_call_per_step`` (a model whose
    forward reduces its output over time, :func:`reduces_time`) one ``[1, B, ...]`` call per step; a
    single-step model gets one call per step. Neuron state carries over between calls, as in the user's
    own loop.
    """
    if not sequence_model:
        return [_one_step(choose_output(model(x), choice), x) for x in chunk]
    if one_call_per_step:
        return [_per_step(choose_output(model(chunk[t : t + 1]), choice), 1, chunk.shape[1])[0]
                for t in range(chunk.shape[0])]
    return _per_step(choose_output(model(chunk), choice), chunk.shape[0], chunk.shape[1])


def _one_step(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A single-step model's output for one step ``x`` ``[B, ...]``: it must keep the batch dimension."""
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise LayoutError(
            f"one time step x_seq[t] has shape {tuple(x.shape)}, and the model's output for it {tuple(out.shape)}: "
            f"it should keep the batch dimension, [{x.shape[0]}, ...]. x_seq must be time-first [T, B, ...]; a "
            "batch without the time dimension, [B, features], is taken for B steps of one sample without its "
            "batch dimension. Add the time dimension (for a static input, x.unsqueeze(0).repeat(T, 1, ...))."
        )
    return out


RngStates = Tuple[torch.Tensor, Optional[torch.Tensor]]
BufferCopies = List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]]


def rng_states(device: torch.device) -> RngStates:
    """torch's random state on the CPU, and on ``device`` when it is a CUDA device, for :func:`set_rng_states`."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_states(states: RngStates, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def buffer_copies(model: nn.Module, skip: Iterable[Tuple[int, str]] = ()) -> BufferCopies:
    """``(module, name, buffer, copy of its values)`` for every buffer of ``model`` but those named in
    ``skip`` (``(id(module), name)``), for :func:`restore_buffers`."""
    skip = set(skip)
    return [(module, name, value, value.detach().clone()) for module in model.modules()
            for name, value in module._buffers.items() if value is not None and (id(module), name) not in skip]


def restore_buffers(copies: BufferCopies) -> None:
    """Put every buffer back, the same tensor with its old values (batch-norm statistics, counters)."""
    with torch.no_grad():
        for module, name, value, kept in copies:
            module._buffers[name] = value
            if value.shape != kept.shape:  # resized in place meanwhile (a QAT observer's first min/max)
                value.resize_(kept.shape)
            value.copy_(kept)


@contextlib.contextmanager
def undone_eval_forwards(model: nn.Module, reset: Callable[[], None],
                         rng_device: Optional[torch.device] = None) -> Iterator[None]:
    """Forwards a learner runs for itself (a probe of the model's layout): in eval mode, so that no
    batch-norm statistic or dropout draw is spent, and afterwards every buffer back (what counts in eval
    mode too: a QAT observer's min/max), each module's train/eval mode as it was, torch's random state too
    (with ``rng_device``: the CPU's and that device's), and the state reset (``reset``)."""
    modes = [(m, m.training) for m in model.modules()]
    rng = rng_states(rng_device) if rng_device is not None else None
    buffers = buffer_copies(model)
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        if rng is not None:
            set_rng_states(rng, rng_device)
        restore_buffers(buffers)
        reset()


@torch.no_grad()
def probe_reduces_time(model: nn.Module, x_seq: torch.Tensor, choice: OutputChoice, reset: Callable[[], None]) -> bool:
    """Whether a multi-step model's forward reduces its output over time (returns a rate, as Spikformer's
    ``head(x.mean(0))``), from two calls on the first step of ``x_seq`` (once alone, once repeated over two
    steps) in eval mode: no batch-norm statistic or dropout draw spent, torch's random state restored, the
    neurons reset (``reset``) before each call and after. Forward hooks of the user's see the two calls; a
    model that reduces over time only in eval mode is taken for one that always does."""
    first = x_seq[:1]
    outs = []
    reduces, other_reduction = False, None
    with undone_eval_forwards(model, reset, rng_device=x_seq.device):
        try:
            for probe in (first, first.expand(2, *first.shape[1:])):
                reset()
                outs.append(choose_output(model(probe), choice))
            reduces = reduces_time(outs[0], outs[1], x_seq.shape[1])
            if reduces:
                other_reduction = _reduction_other_than_mean(model, x_seq[:8], choice, reset)
        except Exception:
            reduces = False  # a model that cannot take such a call: the real call says what is wrong
    if other_reduction is not None:  # outside the probe: a warnings filter set to "error" raises it to the user
        warnings.warn(other_reduction, OnlineLossWarning, stacklevel=user_stacklevel())
    return reduces


def _reduction_other_than_mean(model: nn.Module, x: torch.Tensor, choice: OutputChoice,
                               reset: Callable[[], None]) -> Optional[str]:
    """Online mode calls a model that reduces its output over time one step at a time and trains
    ``mean_t loss(o_t, y)``: the meaning of the user's loss when the reduction is a mean (documented). A max,
    a sum, the last step or a nonlinear head after the mean give another output over the sequence than the
    mean of the one-step outputs: the warning that says so, or None (from the first batch's first steps, in
    eval mode; a model whose one-step outputs change from one run to the next, as with a Poisson encoder in
    its forward, cannot be told apart and gets none)."""
    if len(x) < 2:
        return None

    def per_step() -> torch.Tensor:
        reset()
        return torch.stack([choose_output(model(x[t : t + 1]), choice) for t in range(len(x))])

    reset()
    whole = choose_output(model(x), choice)
    steps = per_step()
    if not whole.is_floating_point() or whole.shape != steps.shape[1:]:
        return None

    # float32: 1e-4 of the outputs' scale; bfloat16/float16 outputs (a half-precision model, the user's own
    # autocast) sum in another order per call: a few of their epsilons
    tolerance = max(1e-4, 16 * torch.finfo(whole.dtype).eps)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a - b).abs().max()) <= tolerance * max(1.0, float(b.abs().max()))

    mean = steps.mean(0)
    if close(whole, mean) or not close(per_step(), steps):  # a mean, or random draws in the forward
        return None
    kinds = [name for name, value in (("a sum", steps.sum(0)), ("a max", steps.amax(0)), ("the last", steps[-1]))
             if close(whole, value)]
    return (
        f"this model's forward reduces its output over time, but not by a mean (over the first {len(x)} steps "
        f"of the first batch its output is {' or '.join(kinds) if kinds else 'not the mean'} of its one-step outputs; "
        f"largest difference from their mean {float((whole - mean).abs().max()):.3g}). Online SLTT calls such a "
        "model one step at a time and trains the mean over steps of the loss of each step's output, mean_t "
        "loss(o_t, y), as SLTT does, not your loss of the reduced output. For the SLTT gradient of the loss of "
        "the reduced output (a max-over-time readout, say), use zero-change mode: slr.wrap(model, rule='sltt') "
        "and your own loop."
    )


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised by the caller that points at the first frame outside this
    package (the user's ``step()`` or ``predict()`` call, however deep the package's own calls go)."""
    inside = tuple(os.path.dirname(os.path.abspath(path)) + os.sep  # (torch: its no_grad decorator's frames)
                   for path in (os.path.dirname(os.path.abspath(__file__)), torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def reduces_time(one: torch.Tensor, two: torch.Tensor, batch: int) -> bool:
    """Whether a multi-step model's forward reduces its output over time (returns a rate, ``.mean(0)``, as
    Spikformer's does), from its outputs for a one-step and a two-step input: the same shape ``[B, ...]``
    for both. Per-step outputs ``[1, B, ...]`` / ``[2, B, ...]``, or anything else (a batch-first
    ``[B, T, ...]``, which the next call then refuses), are not."""
    return one.shape == two.shape and one.dim() >= 1 and one.shape[0] == batch


def _per_step(out: torch.Tensor, steps: int, batch: int) -> List[torch.Tensor]:
    if out.dim() >= 2 and out.shape[0] == steps and out.shape[1] == batch:
        return list(out.unbind(0))
    if steps == 1 and out.shape[0] == batch:
        return [out]  # the model reduced its output over time: over one step, that step's output
    raise LayoutError(
        f"a multi-step model given [T={steps}, B={batch}, ...] returned shape {tuple(out.shape)}; "
        "snn-localrules needs per-step outputs [T, B, ...] (or, from a forward that reduces its output over "
        "time, [B, ...] for a one-step input). Return the output sequence from forward, or use zero-change mode."
    )


def named_neurons(model: nn.Module, neurons: Sequence[NeuronAdapter], most: int = 4) -> str:
    """``'3' (spikingjelly.LIFNode), 'lif2' (snntorch.Leaky), ...``: where each neuron sits in ``model``."""
    names = {id(module): name for name, module in model.named_modules()}
    listed = ", ".join(f"{names.get(id(neuron.module)) or '<model>'!r} ({neuron.describe()})"
                       for neuron in neurons[:most])
    return listed + (f", ... ({len(neurons)} in all)" if len(neurons) > most else "")


WholeSequenceModules = List[Tuple[str, nn.Module, str]]


def whole_sequence_modules(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> WholeSequenceModules:
    """``(name in model, module, why)`` for each module that must get the whole sequence in every call
    (the plugins' ``slr_whole_sequence_modules``: a temporal-effective batch norm's per-step scales, ...)."""
    names = {id(module): name for name, module in model.named_modules()}
    found = plugin_manager().hook.slr_whole_sequence_modules(model=model, neurons=neurons)
    return [(names.get(id(module)) or "<model>", module, why) for answer in found for module, why in (answer or ())]


def whole_sequence_error(found: WholeSequenceModules, how: str, fix: str) -> UnsupportedModelError:
    """The error for a learner that would feed ``found``'s modules part of a sequence per call (``how``)."""
    name, module, why = found[0]
    more = f" ({len(found) - 1} more such module{'s' if len(found) > 2 else ''} in the model)" if len(found) > 1 else ""
    return UnsupportedModelError(
        f"{name!r} ({type(module).__name__}) {why}, so it must get the whole sequence in every call of the "
        f"model{more}; {how}. {fix}"
    )


def repeated_neurons_error(model: nn.Module, neurons: Sequence[NeuronAdapter], rule: str,
                           batchless: bool = False) -> WrapError:
    """The error for neurons that ran more than once while an online learner fed the model one time step
    (``[B, ...]``) per call: its forward loops over time itself, or (TP, which keeps one trace per neuron
    module) one neuron instance serves two layers. ``batchless``: their inputs had lost the batch
    dimension, so the forward can only have looped over it."""
    return WrapError(
        f"the neuron module(s) {named_neurons(model, neurons)} ran more than once in one call of the model"
        + (", on inputs without the batch dimension," if batchless else ",")
        + f" while rule={rule!r} feeds the model one time step [B, ...] per call. "
        + ("The model's forward loops over time itself, and treats the batch rows as time steps: "
           if batchless else "Either the model's forward loops over time itself: ")
        + "let the learner run the time loop, with a forward that computes one step; or, if forward steps "
        "through the first dimension of its input and resets no state, pass multi_step=True so that it gets "
        "[T, B, ...] sequences"
        + ("; or keep your own loop in zero-change mode, slr.wrap(model, rule='sltt') without an optimizer"
           if rule == "sltt" else "")
        + ("." if batchless else
           ". Or one neuron instance serves two layers: give each layer its own (copy.deepcopy the neuron).")
    )


class NeuronCalls:
    """Counts how often each neuron module runs, and on what, until :meth:`remove`. A model fed one time
    step ``[B, ...]`` per call whose neurons run more often than the model, on inputs that have lost the
    batch dimension, has a forward that loops over time itself: it steps through the batch rows. (A neuron
    instance used twice per step runs twice on ``[B, ...]``: SLTT cuts its state at each call.) Temporary
    forward pre-hooks, for a learner's first batch."""

    def __init__(self, neurons: Sequence[NeuronAdapter], batch: int, model: Optional[nn.Module] = None):
        self.neurons = list(neurons)
        self.batch = batch
        self.calls: Dict[int, int] = {}
        self.batchless: set = set()
        #: ``model`` given (a model fed ``[c, B, ...]``): the one-step neurons that ran fewer than c times in
        #: a call of c > 1 steps (they took the steps for samples: ``[c, B, ...]`` or ``[c * B, ...]``), and
        #: those handed ``[c, B, ...]`` itself (counted only to explain a call that failed)
        self.merged: set = set()
        self.handed_sequence: set = set()
        self._steps: Optional[int] = None  # c of the model call running now
        self._in_call: Dict[int, int] = {}  # neuron runs in that call
        self._one_step = {id(n.module) for n in self.neurons if not n.multi_step}
        self._handles = [n.module.register_forward_pre_hook(self._count)
                         for n in {id(n.module): n for n in self.neurons}.values()]
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._model_call))
            self._handles.append(model.register_forward_hook(lambda *_: self._settle()))

    def _model_call(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        self._steps = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        self._in_call = {}

    def _settle(self) -> None:
        """Judge the model call that ran (or failed) last."""
        if self._steps is not None and self._steps > 1:
            self.merged.update(m for m, runs in self._in_call.items() if m in self._one_step and runs < self._steps)
        self._steps, self._in_call = None, {}

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        self._in_call[id(module)] = self._in_call.get(id(module), 0) + 1
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != self.batch):
            self.batchless.add(id(module))
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == (self._steps, self.batch):
            self.handed_sequence.add(id(module))

    def check(self, model: nn.Module, model_calls: int, rule: str, sequences: bool = False,
              failed: bool = False) -> None:
        """Raise :func:`repeated_neurons_error` if a neuron ran more than ``model_calls`` times on inputs
        without the batch dimension. ``sequences``: the model was fed ``[c, B, ...]``; then a neuron that
        takes one step per call (not in multi-step mode) must run c times in a call of c > 1 steps (a model
        that steps through time itself hands it ``[B, ...]`` or tokens ``[N, B, ...]`` each step), else it
        took the steps for samples: a :class:`LayoutError` says so. ``failed``: the call raised; a neuron
        handed ``[c, B, ...]`` is then taken as the cause too (one step calls cannot be counted)."""
        if sequences:
            self._settle()  # a call that raised never reached the model's forward hook
            flagged = self.merged | (self.handed_sequence if failed else set())
            merged = [n for n in self.neurons if not n.multi_step and id(n.module) in flagged]
            if merged:
                raise LayoutError(
                    f"the model is fed [c, B, ...] sequences (multi_step=True), but its neuron(s) "
                    f"{named_neurons(model, merged)}, which take one time step [B, ...] per call, got inputs "
                    "whose first dimension is not the batch: they took the time steps for more samples, with "
                    "no state carried from step to step (snnTorch's neurons always take one step per call). "
                    "Drop multi_step=True: the learner then calls the model once per step."
                )
            return
        looped = [n for n in self.neurons
                  if self.calls.get(id(n.module), 0) > model_calls and id(n.module) in self.batchless]
        if looped:
            raise repeated_neurons_error(model, looped, rule, batchless=True)
        runs = {self.calls.get(id(n.module), 0) for n in self.neurons}
        if model_calls > 0 and len(runs) == 1:
            (total,) = runs
            # a neuron instance or a block used at two or three places of a model also runs that often per
            # step: a time loop is told from such reuse by four runs or more, or by the failed call
            if total % model_calls == 0 and total // model_calls >= (2 if failed else 4):
                # every neuron ran k times per call fed one step: a forward with its own time loop over a
                # fixed number of steps (the snnTorch tutorials' `for step in range(num_steps)`)
                message = (
                    f"every neuron of the model ran {total // model_calls} times in each call fed one time step: "
                    "its forward seems to loop over time itself (for step in range(num_steps)). Online "
                    f"{rule} calls the model once per step of x_seq and cuts the state at each call, so a batch "
                    "runs T times that loop and memory is no longer flat in T. Let forward take one step "
                    "[B, ...] and feed x_seq [T, B, ...] to step(), or keep your loop in zero-change mode "
                    "(slr.wrap(model, rule='sltt'))."
                )
                if failed:
                    raise LayoutError(message)
                warnings.warn(message, OnlineLossWarning, stacklevel=user_stacklevel())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def contiguous_runs(selected: Iterable[int], steps: int) -> List[tuple]:
    """Split ``range(steps)`` into runs ``(start, stop, is_selected)`` of consecutive steps."""
    chosen = set(selected)
    runs: List[tuple] = []
    for t in range(steps):
        flag = t in chosen
        if runs and runs[-1][2] == flag:
            runs[-1] = (runs[-1][0], t + 1, flag)
        else:
            runs.append((t, t + 1, flag))
    return runs


def check_finite_gradients(model: nn.Module, params: List[torch.Tensor]) -> None:
    """Raise :class:`NonFiniteLossError` naming the parameters whose gradient has a NaN or inf, before the
    optimizer applies it. A NaN input (or label path) is swallowed by the spike function in forward (NaN
    >= threshold is False) but comes back through the surrogate in backward."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not all_finite(grads):
        names = {id(p): n for n, p in model.named_parameters()}
        bad = [names.get(id(p), "?") for p in params if p.grad is not None and not p.grad.isfinite().all()]
        raise NonFiniteLossError(
            f"non-finite gradients in {', '.join(bad[:5])}; nothing was updated. Check the input for "
            "NaN/inf values, the input scale and the learning rate."
        )


def check_common_options(seed: Any, T: Any, multi_step: Any, seed_may_be_none: bool) -> None:
    """Validate the options both rules take: ``seed``, ``T``, ``multi_step``."""
    if not ((isinstance(seed, numbers.Integral) and not isinstance(seed, bool)) or (seed is None and seed_may_be_none)):
        allowed = "an int or None" if seed_may_be_none else "an int"
        raise WrapError(f"seed must be {allowed}, got {seed!r}.")
    if T is not None and (not isinstance(T, int) or isinstance(T, bool) or T < 1):
        raise WrapError(f"T must be a positive int or None, got {T!r}.")
    if not (multi_step is None or isinstance(multi_step, bool)):
        raise WrapError(f"multi_step must be None (found out from the model), True or False, got {multi_step!r}.")


def check_output_choice(output: Any) -> None:
    """Validate the ``output=`` option: which element of a tuple model output the loss reads."""
    if output is None or callable(output) or (isinstance(output, numbers.Integral) and not isinstance(output, bool)):
        return
    raise WrapError(
        f"output must be an index into the model's tuple output (snnTorch's (spk, mem): 0 for the spikes, -1 for "
        f"the membrane), a callable output -> tensor, or None; got {output!r}."
    )


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """True when no element of ``tensors`` is NaN or infinite. One fused norm per device instead of an
    elementwise mask per tensor: a non-finite element makes its tensor's norm non-finite (an overflowing
    norm, above ~1e19 per element in fp32, counts as non-finite too: such a gradient has diverged)."""
    norms = torch._foreach_norm(tensors) if hasattr(torch, "_foreach_norm") else [t.norm() for t in tensors]
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def check_devices(model: nn.Module, x_seq: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """Check that ``x_seq`` is on the device of the model's parameters (when they are all on one device)
    and ``y`` on the device of ``x_seq``; a model split over devices is not checked."""
    devices = {p.device for p in model.parameters()}
    if len(devices) == 1:
        (device,) = devices
        if x_seq.device != device:
            raise LayoutError(
                f"x_seq is on {x_seq.device} but the model's parameters are on {device}; move the batch: "
                f"x_seq.to({str(device)!r}) (or the model: model.to(x_seq.device))."
            )
    if y is not None and y.device != x_seq.device:
        raise LayoutError(f"y is on {y.device} but x_seq is on {x_seq.device}; pass y.to(x_seq.device).")


def check_finite_input(x_seq: torch.Tensor) -> None:
    """Refuse an input holding NaN or inf (one host sync). The spike function hides a NaN in forward
    (``NaN >= threshold`` is False) and a rule that updates at every step would apply its NaN gradient.
    Checked one step at a time: a check of the whole ``[T, B, ...]`` at once would allocate temporaries the
    size of the input, and a rule whose memory does not grow with T (TP) would grow with it."""
    finite = torch.ones((), dtype=torch.bool, device=x_seq.device)
    for x_t in x_seq:
        finite &= torch.isfinite(x_t).all()
    if not bool(finite):
        bad = sum(int((~torch.isfinite(x_t)).sum()) for x_t in x_seq)
        raise LayoutError(
            f"x_seq holds {bad} NaN/inf value(s); nothing was run or updated. Clean the input "
            "(torch.nan_to_num(x_seq)) or find where the data pipeline produces them."
        )


def _state_buffers(neurons: Sequence[NeuronAdapter]) -> set:
    return {(id(n.module), name) for n in neurons for name in n.state_names}


def check_neurons_pass_gradients(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> None:
    """Refuse to train (or to diagnose) through a neuron that, as it is set now, passes no gradient to its
    input: every layer below it would silently stay as it is (:meth:`NeuronAdapter.passes_no_gradient`
    says why)."""
    blocked = [(neuron, reason) for neuron in neurons for reason in (neuron.passes_no_gradient(),) if reason]
    if not blocked:
        return
    listed = named_neurons(model, [neuron for neuron, _ in blocked])
    passes = "passes no gradient to its" if len(blocked) == 1 else "pass no gradient to their"
    raise WrapError(
        f"{listed} {passes} input now, so only the layers after the last neuron would get one: "
        f"{blocked[0][1]}."
    )


def guarded_step(finite_input: bool = False, restore: Sequence[str] = ()) -> Callable:
    """Decorator for a rule's ``step(x_seq, y)``: checks that need the model, and all-or-nothing on failure.

    Before the step: the learner is wrapped and not already inside its own ``step`` (a re-entrant call from
    the model's forward or a hook), ``x_seq``/``y`` pass :func:`check_sequence_batch` (with the learner's
    ``T`` if it has one), lie on the model's device (:func:`check_devices`) and, with ``finite_input``, hold no NaN/inf. While the step runs,
    :meth:`Rule.unwrap` refuses. If the step raises, the model's buffers (BN running statistics; not the
    neurons' carried state, which the step resets) get their values from before the call back, and so do
    the learner attributes named in ``restore`` (e.g. TP's label projection, made from the first batch), so
    that a failed first batch cannot leave a learner that refuses every later batch.
    """

    def decorate(step: Callable) -> Callable:
        @functools.wraps(step)
        def guarded(self: Rule, x_seq: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_wrapped()
            self._check_structure()
            if getattr(self, "_stepping", False):
                raise WrapError(
                    f"step() was called while this {self.name} learner's step() is running (from inside "
                    "the model's forward or a hook?); call it from the training loop only."
                )
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                raise WrapError(
                    "step() trains through autograd, but gradients are off here (inside torch.no_grad() or "
                    "torch.inference_mode()); call it outside that block. To evaluate, use "
                    "learner.predict(x_seq)."
                )
            check_sequence_batch(x_seq, y, getattr(self, "T", None))  # the one layout check of a step
            check_devices(self.model, x_seq, y)
            check_neurons_pass_gradients(self.model, self.neurons)
            if finite_input:
                check_finite_input(x_seq)
            buffers = buffer_copies(self.model, skip=_state_buffers(self.neurons))
            saved = {name: getattr(self, name) for name in restore}
            self._stepping = True
            try:
                return step(self, x_seq, y, *args, **kwargs)
            except BaseException:
                restore_buffers(buffers)
                for name, value in saved.items():
                    setattr(self, name, value)
                raise
            finally:
                self._stepping = False

        return guarded

    return decorate
