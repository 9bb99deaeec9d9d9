"""SpikingJelly adapter (``spikingjelly.activation_based``, 2.x; 0.0.0.0.14 by the same features).

Any ``MemoryModule`` that keeps a membrane memory ``v`` is a neuron: ``IFNode``, ``LIFNode``,
``ParametricLIFNode``, ``EIFNode``, ``QIFNode``, ``IzhikevichNode``, ``CUBALIFNode``, ... and user
subclasses of ``BaseNode`` / ``SimpleBaseNode``. All of its memories (``v`` and e.g. adaptation ``w``) are
its carried state. Both step modes are supported; ``functional.reset_net`` keeps working, since no module
of the model is replaced.

SpikingJelly 0.0.0.0.14's legacy package ``spikingjelly.clock_driven`` (which many published models pin) is
supported too: its neurons derive from another ``MemoryModule`` (``clock_driven.base``). Its single-step
classes (``IFNode``, ``LIFNode``, ``ParametricLIFNode``, ...) take ``[B, ...]``; its ``MultiStep*`` classes
take ``[T, B, ...]`` and are stepped through the single-step parent's ``forward`` whatever their
``backend``, so a ``backend='cupy'`` neuron trains in plain torch (on CPU, or on a GPU without CuPy).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import sys
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from snn_localrules.adapter import NeuronAdapter, NeuronInfo, stack_steps
from snn_localrules.errors import UnsupportedModelError
from snn_localrules.hookspecs import hookimpl

_BASE = "spikingjelly.activation_based.base"
_NEURON_PACKAGE = "spikingjelly.activation_based.neuron"
_SURROGATE = "spikingjelly.activation_based.surrogate"
# SpikingJelly <= 0.0.0.0.14's legacy package: a MemoryModule class of its own, no step_mode
_LEGACY_BASE = "spikingjelly.clock_driven.base"
_LEGACY_NEURON_PACKAGE = "spikingjelly.clock_driven.neuron"

# SpikingJelly classes whose multi-step forward snn_localrules.functional.sltt_multistep reproduces exactly
_FUSABLE_CLASSES = {"IFNode": "if", "LIFNode": "lif", "ParametricLIFNode": "plif"}
# a subclass that overrides any of these may compute something else: it is stepped, never fused
_FORWARD_METHODS = (
    "forward", "single_step_forward", "multi_step_forward", "single_step_functional_forward",
    "multi_step_functional_forward", "materialize_states",
)
# surrogates whose forward is random: the fused backward evaluates the surrogate again
_RANDOM_SURROGATES = ("PoissonPass",)


def _sigmoid_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # alpha s (1 - s), s = sigmoid(alpha z)
        s = z.mul_(alpha).sigmoid_()
        return s.addcmul_(s, s, value=-1.0).mul_(alpha)
    return derivative


def _atan_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # (alpha/2) / (1 + (pi alpha/2 z)^2)
        return z.mul_(math.pi * alpha / 2).square_().add_(1.0).reciprocal_().mul_(alpha / 2)
    return derivative


def _piecewise_quadratic_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # max(0, alpha - alpha^2 |z|)
        return z.abs_().mul_(-alpha * alpha).add_(alpha).clamp_min_(0.0)
    return derivative


def _piecewise_exp_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # (alpha/2) exp(-alpha |z|)
        return z.abs_().mul_(-alpha).exp_().mul_(alpha / 2)
    return derivative


def _erf_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # alpha/sqrt(pi) exp(-(alpha z)^2)
        return z.mul_(alpha).square_().neg_().exp_().mul_(alpha / math.sqrt(math.pi))
    return derivative


def _soft_sign_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # 1 / (2 alpha (1/alpha + |z|)^2)
        return z.abs_().add_(1.0 / alpha).square_().mul_(2.0 * alpha).reciprocal_()
    return derivative


def _super_spike_derivative(alpha: float):
    def derivative(z: torch.Tensor) -> torch.Tensor:  # alpha / (1 + |z|)^2
        return z.abs_().add_(1.0).square_().reciprocal_().mul_(alpha)
    return derivative


# closed-form, in-place derivatives of SpikingJelly's surrogates (spiking mode), by class name: the fused
# backward then needs one temporary; tests/test_sltt_multistep.py checks each against the class's backward
_SURROGATE_DERIVATIVES = {
    "Sigmoid": _sigmoid_derivative,
    "ATan": _atan_derivative,
    "PiecewiseQuadratic": _piecewise_quadratic_derivative,
    "PiecewiseExp": _piecewise_exp_derivative,
    "Erf": _erf_derivative,
    "SoftSign": _soft_sign_derivative,
    "SuperSpike": _super_spike_derivative,
}


def surrogate_derivative(function: Any):
    """The in-place derivative ``z -> sg(z)`` of a SpikingJelly surrogate object, or None if it has no
    closed form here (then the fused backward differentiates the object itself)."""
    factory = _SURROGATE_DERIVATIVES.get(type(function).__name__)
    alpha = getattr(function, "alpha", None)
    if (factory is None or type(function).__module__ != _SURROGATE or not getattr(function, "spiking", False)
            or isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        return None
    return factory(float(alpha))


def _base_module():
    """SpikingJelly's ``base`` module if the program imported SpikingJelly, else None (never imports it)."""
    return sys.modules.get(_BASE)


def _nothing() -> None:
    pass


def _backend_runs_here(module: nn.Module, x: Any) -> bool:
    """False when ``module`` would run a CuPy kernel that cannot run on ``x``: ``backend='cupy'`` and
    ``x`` is not a CUDA tensor or CuPy is not installed (SpikingJelly imports it when it is)."""
    if getattr(module, "backend", "torch") != "cupy":
        return True
    return isinstance(x, torch.Tensor) and x.is_cuda and sys.modules.get("cupy") is not None


def _is_neuron(module: nn.Module, base) -> bool:
    memories = getattr(module, "_memories", None)
    return isinstance(module, base.MemoryModule) and isinstance(memories, dict) and "v" in memories


def _input_only_through_state(cls: type) -> bool:
    """``RAFNode`` (resonate-and-fire): the input enters ``u``, and the firing component ``v`` sees ``u``
    of the previous step only, so with the carried state cut (SLTT, TP) no gradient passes the neuron."""
    raf = getattr(sys.modules.get("spikingjelly.activation_based.neuron"), "RAFNode", None)
    return isinstance(raf, type) and issubclass(cls, raf)


def _is_ottt(cls: type) -> bool:
    """SpikingJelly's ``OTTTLIFNode`` (online training through time: its own gradient, through traces)."""
    return any(k.__name__ == "OTTTLIFNode" and k.__module__.startswith("spikingjelly.") for k in cls.__mro__)


def _is_recurrent_container(module: nn.Module, base) -> bool:
    # layer.LinearRecurrentContainer / ElementWiseRecurrentContainer: they feed their last output y
    # back into the wrapped neuron, a temporal route that SLTT cuts like a membrane
    memories = getattr(module, "_memories", None)
    return (
        isinstance(module, base.MemoryModule)
        and isinstance(memories, dict)
        and "y" in memories
        and isinstance(getattr(module, "sub_module", None), nn.Module)
    )


class SpikingJellyNeuron(NeuronAdapter):
    """Adapter for one SpikingJelly neuron module."""

    framework = "spikingjelly"

    @property
    def fused_outputs_binary(self) -> bool:  # type: ignore[override]
        # the fused form runs the surrogate's own forward: a Heaviside for most, but MultiLevelSpikeCount
        # emits counts (0..K), which one byte would wrap
        return _emits_spikes(self.module.surrogate_function)

    @property
    def state_names(self):  # type: ignore[override]
        return tuple(self.module._memories)

    def get_state(self) -> Dict[str, Any]:
        return dict(self.module._memories)

    def set_state(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            self.module._memories[name] = value

    def reset_state(self) -> None:
        self.module.reset()

    @property
    def supports_multi_step(self) -> bool:
        return callable(getattr(type(self.module), "multi_step_forward", None))

    @property
    def multi_step(self) -> bool:
        return getattr(self.module, "step_mode", "s") == "m"

    def single_step(self, x: torch.Tensor, *args, **kwargs) -> Any:
        cls = type(self.module)
        if not _forward_dispatches(cls):
            # the class's own forward adds to the step (MPBNLIFNode writes its membrane batch norm's
            # statistics back there; a user's subclass may scale the input): run it, in single-step mode
            module, mode = self.module, self.module.step_mode
            module.step_mode = "s"
            try:
                return cls.forward(module, x, *args, **kwargs)
            finally:
                module.step_mode = mode
        return cls.single_step_forward(self.module, x, *args, **kwargs)

    def own_forward(self, x: torch.Tensor, *args, **kwargs) -> Any:
        # A multi-step call whose backend is CuPy's, where CuPy cannot run (a CPU tensor, or no CuPy: a
        # model built on a GPU box and loaded elsewhere), runs step by step in torch: SpikingJelly's torch
        # multi-step forward, the reference its CUDA kernels reproduce.
        if self.multi_step and not args and not kwargs and not _backend_runs_here(self.module, x):
            return self.run_steps(x, _nothing)
        return super().own_forward(x, *args, **kwargs)

    def passes_no_gradient(self) -> Optional[str]:
        if self.module.training or not _eval_forward_is_heaviside(type(self.module)):
            return None
        return (
            f"in eval mode this release's {type(self.module).__name__} runs a Heaviside without surrogate "
            "(SpikingJelly before 2.0). Call model.train() before step(); to keep batch norm on its running "
            "statistics, put only the BatchNorm layers in eval mode"
        )

    def _keeps_v_seq(self) -> bool:
        # with ``store_v_seq`` a multi-step call leaves the post-reset membrane of every step in ``v_seq``
        return bool(getattr(self.module, "store_v_seq", False))

    def run_steps(self, x_seq: torch.Tensor, before_step) -> torch.Tensor:
        _check_steppable(self.module)
        # keep the ``v_seq`` [T, N, *] contract of the neuron's own multi-step call when it is stepped, and
        # ComplementaryLIFNode's ``state_seqs`` (each memory's sequence) where it stores them
        keep_v = self._keeps_v_seq()
        keep_states = bool(getattr(self.module, "store_state_seqs", False))
        outputs, voltages, states = [], [], []
        for x in x_seq:
            before_step()
            outputs.append(self.single_step(x))
            if keep_v:
                voltages.append(self.module.v)
            if keep_states:
                states.append(tuple(self.module._memories.values()))
        if keep_v:
            self.module.v_seq = stack_steps(voltages)
        if keep_states:
            self.module.state_seqs = [stack_steps(list(seq)) for seq in zip(*states)]
        return stack_steps(outputs)

    def fused_sltt_multi_step(self, x_seq: torch.Tensor) -> Optional[torch.Tensor]:
        kind = _fusable_kind(self.module, x_seq)
        if kind is None:
            return None
        from snn_localrules.functional.sltt_multistep import sltt_multi_step

        module = self.module
        materialize = getattr(module, "materialize_states", None)
        if callable(materialize):
            v = module._memories["v"]  # a float is a fill: the fused node then keeps the number, not a tensor
            if not isinstance(v, float):
                (v,) = materialize((x_seq,), tuple(module._memories.values()), "m")
            derivative = surrogate_derivative(module.surrogate_function)
        else:
            # before 2.0 v stays a float until the first step fills a tensor with it (v_float_to_tensor);
            # the closed-form derivatives are tested against 2.0's surrogates only: autograd of the object
            v = module.v
            derivative = None
        spikes, v, v_seq = sltt_multi_step(
            x_seq, v, kind,
            surrogate_function=module.surrogate_function,
            surrogate_derivative=derivative,
            tau=getattr(module, "tau", 2.0),
            w=getattr(module, "w", None),
            decay_input=getattr(module, "decay_input", True),
            v_threshold=module.v_threshold,
            v_reset=module.v_reset,
            detach_reset=module.detach_reset,
            store_v_seq=module.store_v_seq,
        )
        module._memories["v"] = v
        if callable(materialize):  # before 2.0 only store_v_seq makes v_seq, and then nothing is fused
            module.v_seq = v_seq  # None without store_v_seq, as SpikingJelly's own multi-step forward sets it
        return spikes


def _defined_by(cls: type, name: str) -> Optional[type]:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


@functools.lru_cache(maxsize=None)
def _forward_dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` is SpikingJelly's ``MemoryModule.forward``, which only dispatches on the step
    mode; if it is another, stepping runs it (in single-step mode) rather than ``single_step_forward``."""
    owner = _defined_by(cls, "forward")
    return owner is not None and owner.__name__ == "MemoryModule" and owner.__module__ in (_BASE, _LEGACY_BASE)


def _check_steppable(module: nn.Module) -> None:
    own = _own_multi_step(type(module))
    if own is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} defines its own {own}, which snn-localrules would skip: it runs a "
            "multi-step call one time step at a time through the class's single-step forward, to cut the "
            "state between steps. Put what it adds in single_step_forward or forward, or run the model in "
            "single-step mode (functional.set_step_mode(model, 's')) and loop over time."
        )


@functools.lru_cache(maxsize=None)
def _own_multi_step(cls: type) -> Optional[str]:
    """The name of a multi-step method that a class outside SpikingJelly defines (a user's subclass that
    computes its multi-step call its own way, which stepping would skip), else None."""
    for name in ("multi_step_forward", "multi_step_functional_forward"):
        owner = _defined_by(cls, name)
        if owner is not None and not owner.__module__.startswith("spikingjelly."):
            return name
    return None


@functools.lru_cache(maxsize=None)
def _eval_forward_is_heaviside(cls: type) -> bool:
    """Whether ``cls`` has an eval-mode forward without gradient: SpikingJelly 0.0.0.0.14's IF and LIF
    neurons (and LIAF) run ``jit_eval_*`` functions, a Heaviside with no surrogate, when not training."""
    return any(name.startswith("jit_eval_") for name in dir(cls))


def _fusable_class(cls: type) -> Optional[str]:
    """``"if"``/``"lif"``/``"plif"`` when ``cls`` runs SpikingJelly's own IF/LIF/PLIF forward unchanged."""
    for ancestor in cls.__mro__:
        kind = _FUSABLE_CLASSES.get(ancestor.__name__)
        if kind is not None and ancestor.__module__.startswith(_NEURON_PACKAGE):
            same = all(getattr(cls, name, None) is getattr(ancestor, name, None) for name in _FORWARD_METHODS)
            return kind if same else None
    return None


_EMITS_SPIKES: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _emits_spikes(function: Any) -> bool:
    """Whether a surrogate function's forward gives only 0 and 1, probed on values from far below to far
    above the threshold (``MultiLevelSpikeCount`` gives counts up to its K). Remembered per surrogate object
    and its settings (SpikingJelly's surrogates read them at every call, so a changed K is probed again)."""
    settings = (getattr(function, "spiking", None), repr(getattr(function, "_sg_params", None)),
                tuple(sorted((k, v) for k, v in vars(function).items() if isinstance(v, (bool, int, float, str)))))
    try:
        known = _EMITS_SPIKES.get(function)
    except TypeError:  # not weakly referable
        known = None
    if known is not None and known[0] == settings:
        return known[1]
    probe = torch.tensor([-1e4, -10.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 10.0, 1e2, 1e4], device="cpu")
    try:
        with torch.no_grad():
            out = function(probe)
        emits = isinstance(out, torch.Tensor) and bool(((out == 0) | (out == 1)).all())
    except Exception:
        return False  # not remembered: a probe that cannot run here (a meta or fake context) says nothing
    try:
        _EMITS_SPIKES[function] = (settings, emits)
    except TypeError:
        pass
    return emits


def _deterministic_surrogate(function: Any) -> bool:
    """A SpikingJelly surrogate whose forward is deterministic, a Heaviside (``spiking=True``: with
    ``spiking=False`` the neuron outputs the smooth surrogate itself, which is no spike and must not be
    stored as one), and which has nothing to train."""
    cls = type(function)
    if cls.__module__ != _SURROGATE or cls.__name__ in _RANDOM_SURROGATES or not isinstance(function, nn.Module):
        return False
    if not getattr(function, "spiking", True):
        return False
    if any(p.requires_grad for p in function.parameters()):
        return False
    params = getattr(function, "_sg_params", {})
    return not any(isinstance(p, torch.Tensor) and p.requires_grad for p in params.values())


def _older_forward_matches(module: nn.Module, kind: str) -> bool:
    """Whether the fused forward equals this neuron's own, for SpikingJelly before 2.0 (0.0.0.0.14: no
    ``materialize_states``). Its IF/LIF/PLIF training forward runs the same operations in the same order
    as the fused one (tests/test_sj_legacy.py checks it), except: in eval mode it runs a Heaviside without
    surrogate (no gradient), and LIF/PLIF without ``decay_input`` and with a zero rest charge
    ``v * (1 - 1/tau) + x``, which rounds differently from ``v - v/tau + x``. Those are stepped."""
    if not module.training:
        return False
    if kind != "if" and module.decay_input is False and (module.v_reset is None or module.v_reset == 0.0):
        return False
    return True


def _fusable_kind(module: nn.Module, x_seq: torch.Tensor) -> Optional[str]:
    """Which fused SLTT neuron reproduces ``module``'s multi-step call on ``x_seq``, or None.

    Checked at every call (cheap attribute tests): the user may change a neuron's settings between calls.
    Fused only on CPU: on CUDA SpikingJelly runs its own kernels, which the torch formulas are not proven
    to match bit for bit. ``SLR_FUSED_CUDA=1`` in the environment fuses CUDA tensors too, for checking
    that (``tests/test_sltt_multistep.py -k cuda``) and timing it on a GPU; it is off until checked there.
    """
    kind = _fusable_class(type(module))
    if kind is None:
        return None
    if tuple(module._memories) != ("v",) or getattr(module, "_neuron_precision", None) is not None:
        return None
    devices = ("cpu", "cuda") if os.environ.get("SLR_FUSED_CUDA") == "1" else ("cpu",)
    if not isinstance(x_seq, torch.Tensor) or x_seq.device.type not in devices or x_seq.ndim < 1 or x_seq.shape[0] < 1:
        return None
    if x_seq.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    if type(module.v_threshold) is not float or not (module.v_reset is None or type(module.v_reset) is float):
        return None
    if not isinstance(module.detach_reset, bool) or not _deterministic_surrogate(module.surrogate_function):
        return None
    if kind != "if" and not isinstance(getattr(module, "decay_input", None), bool):
        return None
    if kind == "lif" and type(getattr(module, "tau", None)) is not float:
        return None
    if kind == "plif":
        w = getattr(module, "w", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 0 or w.dtype not in (torch.float32, torch.float64):
            return None
    if not callable(getattr(module, "materialize_states", None)) and not _older_forward_matches(module, kind):
        return None
    return kind


class SpikingJellyRecurrentContainer(SpikingJellyNeuron):
    """A recurrent container: its fed-back output is carried state, but it is not a layer of its own
    (the neuron inside it is)."""

    is_layer = False


def _legacy_base_module():
    """``spikingjelly.clock_driven.base`` if the program imported it, else None (never imports it)."""
    return sys.modules.get(_LEGACY_BASE)


def _takes_sequence(forward: Callable) -> bool:
    """True when ``forward``'s input (its first argument after ``self``) is named ``x_seq``: SpikingJelly's
    name for a ``[T, ...]`` input throughout ``clock_driven`` (``MultiStep*`` neurons, ``SeqToANNContainer``)."""
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1] == "x_seq"


# what _legacy_step_forward answers for a multi-step class that has no plain single step to run
_NO_STEP: Any = object()


@functools.lru_cache(maxsize=None)
def _legacy_step_forward(cls: type) -> Optional[Callable]:
    """The single-step ``forward`` that a legacy multi-step neuron class loops over, or None when ``cls``
    is single-step.

    Step-mode test (clock_driven neurons have no ``step_mode``): each ``MultiStep*`` class subclasses a
    single-step neuron (``MultiStepLIFNode(LIFNode)``) and overrides only ``forward``, declared over
    ``x_seq`` ``[T, ...]``, whose torch backend calls ``super().forward(x_seq[t])`` per step (and whose cupy
    backend runs a CUDA kernel instead). So ``cls`` is multi-step when the forward it runs is declared over
    ``x_seq`` and a class further down its MRO defines a per-step ``forward``; that one is returned, which
    is exactly what the torch backend calls. The argument name is what tells ``MultiStepLIFNode`` from
    ``LIAFNode``: both subclass ``LIFNode`` and override only ``forward``, but LIAF's takes one step ``x``.
    A chain of two sequence forwards (a user's ``forward(x_seq)`` around ``MultiStepLIFNode.forward``) is
    refused by the caller: stepping the inner single step would skip the user's code.
    """
    mro = cls.__mro__
    owners = [c for c in mro if "forward" in vars(c) and c is not nn.Module]
    if not owners or not _takes_sequence(owners[0].forward):
        return None
    if len(owners) < 2 or _takes_sequence(owners[1].forward):
        return _NO_STEP
    return owners[1].forward


class LegacySpikingJellyNeuron(SpikingJellyNeuron):
    """Adapter for one neuron of SpikingJelly's legacy ``clock_driven`` package (0.0.0.0.14 and earlier).

    Single-step classes take ``[B, ...]``. ``MultiStep*`` classes take ``[T, B, ...]`` and are run step by
    step through the single-step parent's ``forward`` whatever ``backend`` says (their cupy backend needs
    CuPy and CUDA tensors), keeping the ``v_seq`` memory they fill.
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        step = _legacy_step_forward(type(module))
        name = type(module).__name__
        if step is _NO_STEP:
            raise UnsupportedModelError(
                f"{name} overrides the forward of a legacy SpikingJelly multi-step neuron with another "
                "forward(x_seq); snn-localrules steps such a neuron through its single-step parent and would skip "
                "that code. Move the extra code into a separate module around the neuron, or use "
                "spikingjelly.activation_based neurons (step_mode='m')."
            )
        if step is None and "v_seq" in module._memories:
            raise UnsupportedModelError(
                f"{name} keeps a legacy multi-step memory v_seq but its forward does not take x_seq [T, ...], so "
                "snn-localrules cannot tell whether one call is one time step or a sequence. Name the input of "
                "a sequence forward x_seq (as SpikingJelly's MultiStep* neurons do), or register no v_seq."
            )
        self._step = step

    @property
    def supports_multi_step(self) -> bool:
        return self._step is not None

    @property
    def multi_step(self) -> bool:
        return self._step is not None

    def single_step(self, x: torch.Tensor, *args, **kwargs) -> Any:
        if self._step is not None:
            return self._step(self.module, x, *args, **kwargs)
        return type(self.module).forward(self.module, x, *args, **kwargs)

    def _keeps_v_seq(self) -> bool:
        # MultiStep* neurons always leave the post-reset membrane of every step in v_seq [T, N, *]
        return "v_seq" in self.module._memories

    def fused_sltt_multi_step(self, x_seq: torch.Tensor) -> Optional[torch.Tensor]:
        return None  # no fused form is proven equal to a legacy neuron's forward: stepped

    def describe(self) -> str:
        return f"{self.framework}.clock_driven.{type(self.module).__name__}"


class LegacySpikingJellyRecurrentContainer(LegacySpikingJellyNeuron):
    """A legacy ``clock_driven`` recurrent container (fed-back output ``y``; single-step)."""

    is_layer = False


def _steps_alone(cls: type, base: Any) -> bool:
    """Whether a neuron class has a single-step form (its own ``single_step_forward``, or, in 2.x, a
    ``single_step_functional_forward``), which stepping a multi-step call and cutting its state needs.
    ``GatedLIFNode`` has neither: its parameters are indexed by time step."""
    memory = base.MemoryModule
    for name in ("single_step_forward", "single_step_functional_forward"):
        method = getattr(cls, name, None)
        if method is not None and method is not getattr(memory, name, None):
            return True
    return False


def _why_not_cut(module: nn.Module, base: Any) -> Optional[str]:
    """Why a module of SpikingJelly's neuron package that is not an adapted neuron carries information
    between time steps in a form this adapter cannot cut; None for anything else."""
    if not type(module).__module__.startswith(_NEURON_PACKAGE):
        return None
    if isinstance(module, base.MemoryModule):
        if not _steps_alone(type(module), base):
            return ("it runs only in multi-step mode: it has no single-step forward (it computes over all the "
                    "time steps of a call together), so nothing can be cut between steps")
        memories = getattr(module, "_memories", None)
        kept = ", ".join(memories) if isinstance(memories, dict) and memories else "no registered memory"
        return f"it keeps its state in {kept}, not in a membrane v"
    multi_step_only = getattr(base, "MultiStepModule", None)
    if multi_step_only is not None and isinstance(module, multi_step_only):
        return "it is multi-step only and computes over all the time steps of a call together"
    return None


_RNN_MODULES = ("spikingjelly.activation_based.rnn", "spikingjelly.clock_driven.rnn")


def _is_spiking_rnn(module: nn.Module) -> bool:
    """SpikingJelly's ``SpikingLSTM``/``SpikingGRU``/``SpikingRNN`` (``rnn.SpikingRNNBase``): a plain module
    that runs its own loop over ``[T, B, ...]`` and keeps its hidden state inside one call."""
    return any(cls.__name__ == "SpikingRNNBase" and cls.__module__ in _RNN_MODULES for cls in type(module).__mro__)


@hookimpl
def slr_neuron_adapter(module: nn.Module) -> Optional[NeuronAdapter]:
    if _is_spiking_rnn(module):
        raise UnsupportedModelError(
            f"{type(module).__name__} (spikingjelly) runs its own loop over the time steps of a call and keeps "
            "its hidden state inside that call: SLTT cannot cut that state between steps, and online training, "
            "which calls the model one step at a time, would restart it at every step. For recurrence, wrap "
            "spiking neurons in layer.LinearRecurrentContainer or ElementWiseRecurrentContainer (supported), "
            "or register an adapter for this class (see snn_localrules.NeuronAdapter)."
        )
    base = _base_module()
    if base is not None:
        if _is_ottt(type(module)):
            raise UnsupportedModelError(
                f"{type(module).__name__} (spikingjelly) is SpikingJelly's own OTTT neuron: in training it returns "
                "[spike, trace] for OTTTSequential, which computes OTTT's gradient from the trace; wrapped, that "
                "gradient would stay OTTT's, not become SLTT's or TP's. Use LIFNode (the same parameters) to "
                "train with this plugin, or keep SpikingJelly's OTTT training."
            )
        if _input_only_through_state(type(module)):
            raise UnsupportedModelError(
                f"{type(module).__name__} (spikingjelly) passes its input to its spikes only through the state "
                "it carries from one step to the next (the input enters u; v, which fires, sees u of the "
                "previous step), so cutting that state at every step, which SLTT and TP do, leaves no gradient "
                "for any layer before it. Use a neuron whose input charges v within the step (LIFNode, "
                "IzhikevichNode, ...; slr.neurons() lists them), or train this model with plain BPTT."
            )
        if _is_neuron(module, base) and _steps_alone(type(module), base):
            if getattr(module, "step_mode", "s") == "m":
                _check_steppable(module)
            return SpikingJellyNeuron(module)
        if _is_recurrent_container(module, base):
            return SpikingJellyRecurrentContainer(module)
        reason = _why_not_cut(module, base)
        if reason is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} (spikingjelly) carries information from one time step to the next, "
                f"but {reason}. SLTT would keep its temporal gradient, and online training would restart it "
                "at every call. Use a neuron that keeps its membrane in v and can run one step "
                "(IFNode, LIFNode, ParametricLIFNode, ...; slr.neurons() lists them), or register an adapter "
                "for this class (see snn_localrules.NeuronAdapter)."
            )
    legacy = _legacy_base_module()
    if legacy is not None:
        if _is_neuron(module, legacy):
            return LegacySpikingJellyNeuron(module)
        if _is_recurrent_container(module, legacy):
            return LegacySpikingJellyRecurrentContainer(module)
    return None


def _other_memory_modules(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> List[nn.Module]:
    """The ``MemoryModule``s of ``model`` that are not wrapped neurons (``layer.Dropout``, ...)."""
    bases = tuple(b.MemoryModule for b in (_base_module(), _legacy_base_module()) if b is not None)
    if not bases:
        return []
    done = {id(n.module) for n in neurons}
    return [m for m in model.modules() if isinstance(m, bases) and id(m) not in done]


@hookimpl
def slr_reset_model(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> None:
    for module in _other_memory_modules(model, neurons):
        module.reset()  # e.g. layer.Dropout's mask, recurrent containers' last output


@hookimpl
def slr_takes_sequences(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> Optional[bool]:
    # activation_based: its multi-step-only modules (MultiStepContainer, SeqToANNContainer, the
    # threshold-dependent and temporal-effective batch norms, ...) derive from base.MultiStepModule;
    # clock_driven (0.0.0.0.14): layer.MultiStepContainer, SeqToANNContainer and the MultiStep* layers
    base = _base_module()
    legacy_layer = _LEGACY_BASE.rsplit(".", 1)[0] + ".layer"
    for module in model.modules():
        if base is not None and isinstance(module, base.MultiStepModule):
            return True
        if any(cls.__module__ == legacy_layer and (cls.__name__.startswith("MultiStep") or cls.__name__ == "SeqToANNContainer")
               for cls in type(module).__mro__):  # a user's subclass too
            return True
    return None


@hookimpl
def slr_whole_sequence_modules(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> List[Tuple[nn.Module, str]]:
    found = []
    for module in model.modules():
        names = {cls.__name__ for cls in type(module).__mro__}  # a user's subclass too
        if any(name.startswith("_TemporalEffectiveBatchNorm") or name.startswith("TemporalEffectiveBatchNorm")
               for name in names):
            found.append((module, "keeps one scale per time step (temporal-effective batch norm)"))
        elif names & {"TemporalWiseAttention", "MultiStepTemporalWiseAttention", "MultiDimensionalAttention"}:
            found.append((module, "weighs the time steps of each call against each other (its weights are "
                                  "sized for T)"))
        elif "Delay" in names and getattr(module, "step_mode", "s") == "m" and _delay_forgets_between_calls(module):
            # SpikingJelly 0.0.0.0.14: its multi-step Delay shifts each call's steps and keeps no queue
            found.append((module, "delays the steps within each call in multi-step mode and keeps nothing for "
                                  "the next call (this release's Delay; in step mode 's' it keeps a queue)"))
    return found


def _delay_forgets_between_calls(module: nn.Module) -> bool:
    """Whether a multi-step ``Delay`` starts every call afresh: a copy, reset, fed ones then zeros (each
    ``delay_steps`` long) returns only zeros the second time."""
    steps = getattr(module, "delay_steps", None)
    if not isinstance(steps, int) or steps < 1:
        return False
    try:
        probe = copy.deepcopy(module)
        probe.reset()
        with torch.no_grad():
            probe(torch.ones(steps, 1, 1))
            return not bool(probe(torch.zeros(steps, 1, 1)).ne(0).any())
    except Exception:
        return False  # not a Delay as SpikingJelly's: nothing to say about it


@hookimpl
def slr_carried_state(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> List[NeuronAdapter]:
    # their memories live in the same _memories dict as a neuron's: the neuron adapter reads and writes it
    return [SpikingJellyNeuron(m) for m in _other_memory_modules(model, neurons)
            if isinstance(getattr(m, "_memories", None), dict) and m._memories]


def _neuron_classes(neuron_module: Any, base: Any) -> List[tuple]:
    """``(name, class)`` of the neuron classes a SpikingJelly neuron module defines: the ``MemoryModule``
    classes whose default instance keeps a membrane ``v`` (classes that need constructor arguments are
    still wrapped when their instances keep ``v``; they are just not listed)."""
    found = []
    for name in dir(neuron_module):
        cls = getattr(neuron_module, name)
        if not (isinstance(cls, type) and issubclass(cls, base.MemoryModule)) or "Base" in name:
            continue
        try:
            probe = cls()
        except Exception:
            continue
        if _is_neuron(probe, base) and not _input_only_through_state(cls) and not _is_ottt(cls):
            found.append((name, cls))
    return found


@hookimpl
def slr_neuron_types() -> List[NeuronInfo]:
    try:
        from spikingjelly.activation_based import base, neuron
    except ImportError:
        return _legacy_neuron_types()
    found = [NeuronInfo("spikingjelly", name, "single- and multi-step") for name, _ in _neuron_classes(neuron, base)]
    return found + _legacy_neuron_types()


def _legacy_neuron_types() -> List[NeuronInfo]:
    """The legacy ``clock_driven`` neuron classes, listed only if the program imported that package."""
    legacy, neuron = _legacy_base_module(), sys.modules.get(_LEGACY_NEURON_PACKAGE)
    if legacy is None or neuron is None:
        return []
    found = []
    for name, cls in _neuron_classes(neuron, legacy):
        notes = ("clock_driven, multi-step [T, B, ...], any backend (stepped in torch)" if _legacy_step_forward(cls)
                 else "clock_driven, single-step")
        found.append(NeuronInfo("spikingjelly", f"clock_driven.{name}", notes))
    return found
