"""snnTorch adapter (1.0; 0.9 has the same neuron layout).

A neuron is a ``snntorch.SpikingNeuron`` whose ``forward(input_, <state>...)`` names its carried state
after its buffers (``Leaky``: ``mem``; ``Synaptic``: ``syn, mem``; ``RLeaky``: ``spk, mem``; ``RSynaptic``;
``Lapicque``; ``SLSTM``, ``SConv2dLSTM``: ``syn, mem``; 1.0's ``DeltaLeaky``: ``mem`` (its call state is
``(mem, mem_prev)``); ``Alpha`` is refused: its input reaches its spikes only through carried state, and so
are 1.0's neurons that compute over a whole sequence in one call). With
``init_hidden=True`` the state lives in the module; with ``init_hidden=False`` the user's ``forward``
passes it in and out, and the adapter cuts it on the way in. Resetting touches only the model's own
neurons, not every instance as ``snntorch.utils.reset`` does.
"""
from __future__ import annotations

import inspect
import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from snn_localrules.adapter import NeuronAdapter, NeuronInfo
from snn_localrules.errors import LossError, UnsupportedModelError
from snn_localrules.functional.losses import StepLoss
from snn_localrules.hookspecs import hookimpl

_NEURON_BASE = "snntorch._neurons.neurons"
_LOSSES = "snntorch.functional.loss"

# per-step decomposable snnTorch losses -> which element of a neuron's output tuple they read: the spikes
# come first and the membrane last in every snnTorch neuron ((spk, mem); Synaptic (spk, syn, mem); Alpha
# (spk, syn_exc, syn_inh, mem))
_STEP_LOSSES = {"ce_rate_loss": 0, "mse_membrane_loss": -1}
_WHY_NOT = {
    "ce_count_loss": "it applies CE to spike counts summed over time; per step, SF.ce_rate_loss() (or loss='ce') "
                     "applies CE to each step's spikes",
    "mse_count_loss": "it compares spike counts summed over time with target counts; per step, loss='mse' "
                      "compares each step's spikes with the one-hot label (a target rate of 1 and 0: pass your own "
                      "callable (o_t, y) -> scalar for other correct_rate/incorrect_rate targets)",
    "ce_max_membrane_loss": "it takes the maximum membrane over time; per step, SF.ce_rate_loss() with output=-1 "
                            "passed to wrap applies CE to each step's membrane, SF.mse_membrane_loss() compares it "
                            "with the label",
    "mse_temporal_loss": "it compares first-spike times, which need the whole sequence",
    "ce_temporal_loss": "it compares first-spike times, which need the whole sequence",
}


def _state_names(cls: type, buffers: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The carried state a neuron class's ``forward(input_, <state>...)`` names. A subclass whose own
    ``forward`` names none of ``buffers`` (``def forward(self, x): return super().forward(x)``) keeps the
    state of the snnTorch class it derives from: the nearest class in its MRO whose ``forward`` names some."""
    for klass in cls.__mro__:
        forward = vars(klass).get("forward")
        if forward is None:
            continue
        try:
            params = tuple(inspect.signature(forward).parameters)[2:]  # skip self, input_
        except (TypeError, ValueError):
            continue
        if buffers is None or any(name in buffers for name in params):
            return params
    return ()


class SnnTorchNeuron(NeuronAdapter):
    """Adapter for one snnTorch neuron module."""

    framework = "snntorch"

    def __init__(self, module: nn.Module):
        super().__init__(module)
        # the registered buffers, those still None too (a DeltaLeaky's mem before its first call)
        buffers = dict(module._buffers)
        self.state_names = tuple(n for n in _state_names(type(module), buffers) if n in buffers)

    def passes_no_gradient(self) -> Optional[str]:
        # surrogate_disable=True (for export) makes the spike function snnTorch's Heaviside without gradient
        bypass = getattr(type(self.module), "_surrogate_bypass", None)
        grad = getattr(self.module, "spike_grad", None)
        if bypass is None or not (grad is bypass or getattr(grad, "__func__", None) is bypass):
            return None
        return (
            "it was built with surrogate_disable=True (for export), so it spikes through a Heaviside with no "
            "surrogate gradient. Build it with surrogate_disable=False for training, or give it a surrogate "
            "(neuron.spike_grad = snntorch.surrogate.atan())"
        )

    def reset_state(self) -> None:
        reset = getattr(self.module, "reset_mem", None)
        if callable(reset):
            reset()
        else:
            for name in self.state_names:
                old = getattr(self.module, name)
                setattr(self.module, name, torch.zeros_like(old))

    @property
    def explicit_state(self) -> bool:
        return not getattr(self.module, "init_hidden", False)

    def detach_call_state(self, args: tuple, kwargs: dict):
        def cut(value):
            if isinstance(value, (tuple, list)):  # DeltaLeaky's state is (mem, mem_prev)
                return type(value)(cut(v) for v in value)
            return value.detach() if isinstance(value, torch.Tensor) and value.requires_grad else value

        args = (args[0],) + tuple(cut(a) for a in args[1:]) if args else args
        kwargs = {k: cut(v) if k in self.state_names else v for k, v in kwargs.items()}
        return args, kwargs


def _no_path_within_a_step(module: nn.Module) -> bool:
    """``Alpha``: its input is added to ``syn_exc`` and subtracted from ``syn_inh``, and ``mem`` is their
    sum, so the input of a step cancels out of that step's membrane and reaches the spikes only through the
    carried state: with that state cut (SLTT, TP) no gradient passes the neuron at all."""
    alpha = getattr(sys.modules.get("snntorch"), "Alpha", None)
    return isinstance(alpha, type) and isinstance(module, alpha)


# snnTorch 1.0's neurons that compute over the whole [T, B, ...] sequence in one call (a convolution in
# time, an nn.RNN, an associative memory over the steps): no state is carried between steps to be cut
_WHOLE_SEQUENCE = {
    "StateLeaky": "convolves its input with the leak kernel over all time steps of the call",
    "LinearLeaky": "convolves its input with the leak kernel over all time steps of the call",
    "LeakyParallel": "runs an nn.RNN over all time steps of the call",
    "AssociativeLeaky": "builds its associative memory over all time steps of the call",
}


def _whole_sequence(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:  # the nearest such class: LinearLeaky derives from StateLeaky
        if cls.__name__ in _WHOLE_SEQUENCE and cls.__module__.startswith("snntorch."):
            return f"{cls.__name__} {_WHOLE_SEQUENCE[cls.__name__]}"
    return None


@hookimpl
def slr_neuron_adapter(module: nn.Module) -> Optional[NeuronAdapter]:
    whole = _whole_sequence(module)
    if whole is not None:
        raise UnsupportedModelError(
            f"{type(module).__name__} (snntorch): {whole}, so there is no state carried from one step to the "
            "next for SLTT or TP to cut, and online training, which calls the model one step at a time, "
            "cannot run it. Use Leaky (or RLeaky, Synaptic, ...; slr.neurons() lists them), which steps in "
            "time, or train this layer with plain BPTT."
        )
    neurons = sys.modules.get(_NEURON_BASE)
    if neurons is None or not isinstance(module, neurons.SpikingNeuron):
        return None
    if _no_path_within_a_step(module):
        raise UnsupportedModelError(
            f"{type(module).__name__} (snntorch) passes its input to its spikes only through the state it "
            "carries from one step to the next (the input enters syn_exc and syn_inh with opposite signs and "
            "cancels in that step's mem), so cutting that state at every step, which SLTT and TP do, leaves no "
            "gradient for any layer before it: training would silently change nothing there. Use Synaptic "
            "(two-state, input within the step) or Leaky, or train this model with plain BPTT."
        )
    adapter = SnnTorchNeuron(module)
    return adapter if adapter.state_names else None


@hookimpl
def slr_step_loss(loss: object) -> Optional[StepLoss]:
    losses = sys.modules.get(_LOSSES)
    if losses is None or type(loss).__module__ != _LOSSES:
        return None
    name = type(loss).__name__
    if name in _STEP_LOSSES and not getattr(loss, "time_var_targets", False):
        # each is (1/T) sum_t of a per-step term: on a one-step sequence it gives exactly that term
        return StepLoss(lambda o, y: loss(o.unsqueeze(0), y), f"snntorch.{name}", _STEP_LOSSES[name])
    if name in _STEP_LOSSES:
        reason = ("it takes a target per time step (time_var_targets=True), but step() takes one label per "
                  "sample, y [B]; build it without time_var_targets, or use zero-change mode")
    else:
        reason = _WHY_NOT.get(name, "it is not known to be a sum of per-time-step terms")
    raise LossError(
        f"snnTorch's {name} cannot be used by an online rule, which backpropagates each time step's "
        f"loss at once: {reason}. Zero-change mode (slr.wrap(model, rule='sltt') and your own loop) keeps "
        f"{name} as it is."
    )


@hookimpl
def slr_neuron_types() -> List[NeuronInfo]:
    try:
        import snntorch
    except ImportError:
        return []
    found = []
    for name in ("Leaky", "Synaptic", "RLeaky", "RSynaptic", "Lapicque", "SLSTM", "SConv2dLSTM", "DeltaLeaky"):
        cls = getattr(snntorch, name, None)
        if cls is not None:
            state = ", ".join(_state_names(cls))
            found.append(NeuronInfo("snntorch", name, f"state: {state}; init_hidden True and False"))
    return found


@hookimpl
def slr_reset_model(model: nn.Module, neurons) -> None:
    return None  # snnTorch keeps no state outside its neurons


@hookimpl
def slr_carried_state(model: nn.Module, neurons) -> List[NeuronAdapter]:
    return []  # snnTorch keeps no state outside its neurons
