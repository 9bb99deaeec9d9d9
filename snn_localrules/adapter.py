"""What the core needs to know about one neuron module: its state, its step mode, one step of it.

A framework plugin returns one :class:`NeuronAdapter` per neuron module from the
``slr_neuron_adapter`` hook. The base class implements everything for the common case of a neuron that
keeps its carried state in module attributes (``state_names``); a plugin overrides what differs.
"""
from __future__ import annotations

import copy
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn


def stack_steps(steps: "list[torch.Tensor]") -> torch.Tensor:
    """Per-step tensors ``[B, ...]`` stacked to ``[T, B, ...]``; a single step is a view, not a copy
    (online training runs multi-step neurons one step per call)."""
    return steps[0].unsqueeze(0) if len(steps) == 1 else torch.stack(steps)


def _detached(value: Any, name: str, owner: Any) -> Any:
    """``value`` with every tensor in it that requires grad detached; ``value`` itself when none does."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if value is None or isinstance(value, (numbers.Number, str, bytes)) or type(value).__module__ == "numpy":
        return value  # holds no graph (numpy scalars and arrays included)
    if isinstance(value, (tuple, list)):
        items = [_detached(item, name, owner) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, dict):
        items = {key: _detached(item, name, owner) for key, item in value.items()}
        if all(items[key] is value[key] for key in value):
            return value
        rebuilt = copy.copy(value)  # keeps a dict subclass's own settings (a defaultdict's factory)
        rebuilt.update(items)
        return rebuilt
    from .errors import PluginError

    describe = owner.describe() if isinstance(owner, NeuronAdapter) else type(owner).__name__
    raise PluginError(
        f"the carried state {name!r} of {describe} is a {type(value).__name__}; snn-localrules can cut "
        "tensors, numbers, None and tuples, lists or dicts of them from the graph. Keep the neuron's state "
        "in such values, or, in its adapter, return them from get_state() or override detach_state()."
    )


@dataclass(frozen=True)
class NeuronInfo:
    """One supported neuron class, as listed by :func:`snn_localrules.neurons`."""

    framework: str
    name: str
    notes: str = ""


class NeuronAdapter:
    """Access to one neuron module's carried state and time stepping.

    Subclass it in a plugin. The defaults assume the state lives in module attributes named by
    ``state_names`` and that calling the module once runs one time step. A neuron whose call can take a
    whole ``[T, B, ...]`` sequence must also override :attr:`supports_multi_step`, :attr:`multi_step` and
    :meth:`single_step`, and :meth:`run_steps` when its output is not one tensor: the core cannot tell a
    sequence from a batch, and would otherwise cut the state once per call (the gradient of BPTT) and feed
    the neuron one step ``[B, ...]`` in online training.

    :param module: the neuron module this adapter speaks for.
    """

    #: name of the framework, shown in listings and error messages
    framework: str = "custom"
    #: attributes of the module that carry state from one time step to the next
    state_names: Tuple[str, ...] = ()
    #: False for modules that carry state but are not a neuron layer of their own (a recurrent
    #: container around a neuron): temporal cuts apply to them, layer-wise rules (TP) skip them
    is_layer: bool = True
    #: True when what :meth:`fused_sltt_multi_step` returns is always exactly 0 or 1 (a Heaviside's
    #: output): the layers after the neuron may then keep it in one byte for backward (``pack_spikes``).
    #: Leave it False for graded or smooth outputs, which would be rounded.
    fused_outputs_binary: bool = False

    def __init__(self, module: nn.Module):
        self.module = module

    def for_module(self, module: nn.Module) -> "NeuronAdapter":
        """This adapter, or one like it for ``module``: a deep copy of a wrapped model carries the rule's
        hooks and per-instance forwards along, and they must act on the copy's own neurons."""
        if module is self.module:
            return self
        copies = self.__dict__.setdefault("_copies", weakref.WeakKeyDictionary())
        adapter = copies.get(module)
        if adapter is None:
            # the plugins build the copy's adapter as they built this one, so whatever an adapter derives
            # from its module in __init__ (a child holding the state) is the copy's; if no plugin answers
            # any more (unregistered since), a shallow copy pointed at the copy's module
            from .plugins import plugin_manager

            adapter = plugin_manager().hook.slr_neuron_adapter(module=module)
            if not isinstance(adapter, NeuronAdapter):
                adapter = copy.copy(self)
                adapter.__dict__.pop("_copies", None)
                adapter.module = module
            copies[module] = adapter
        return adapter

    # -- carried state ---------------------------------------------------------------------------
    def get_state(self) -> Dict[str, Any]:
        """The carried state, ``{name: tensor or scalar}``."""
        return {name: getattr(self.module, name) for name in self.state_names}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Replace the carried state (assigns new objects; never writes into the old tensors)."""
        for name, value in state.items():
            setattr(self.module, name, value)

    def detach_state(self) -> None:
        """Cut the carried state from the autograd graph: the next step sees it as a constant.

        New tensors are assigned; the old ones (which may be the user's) are not modified in place. A state
        value may be a tensor, a number, ``None``, or a tuple (named tuples too), list or dict of them; an
        adapter whose state is another kind of object overrides this method.
        """
        cut = {}
        for name, value in self.get_state().items():
            detached = _detached(value, name, self)
            if detached is not value:
                cut[name] = detached
        if cut:
            self.set_state(cut)

    def reset_state(self) -> None:
        """Return the neuron to its resting state (what the framework's own reset does)."""
        reset = getattr(self.module, "reset", None)
        if not callable(reset):
            raise NotImplementedError(f"{type(self).__name__} must implement reset_state()")
        reset()

    # -- state passed through the call (explicit-state neurons) ------------------------------------
    @property
    def explicit_state(self) -> bool:
        """True when the user's code passes the state in and out of each call (snnTorch
        ``init_hidden=False``). Such a neuron cannot be stepped by a learner: its state lives in the
        user's ``forward``."""
        return False

    def detach_call_state(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """Return ``(args, kwargs)`` of one call with the state arguments detached."""
        return args, kwargs

    # -- time layout -----------------------------------------------------------------------------
    @property
    def supports_multi_step(self) -> bool:
        """True when the module can run in a multi-step mode (then rules may give it a per-instance
        ``forward`` that steps through the sequence)."""
        return False

    @property
    def multi_step(self) -> bool:
        """True when one call of the module processes a whole ``[T, B, ...]`` sequence."""
        return False

    def single_step(self, x: torch.Tensor, *args, **kwargs) -> Any:
        """Run exactly one time step on ``x`` ``[B, ...]`` with the module's class implementation,
        bypassing any per-instance override, and update the carried state."""
        return type(self.module).forward(self.module, x, *args, **kwargs)

    def own_forward(self, x: torch.Tensor, *args, **kwargs) -> Any:
        """One call of the module as its class defines it, bypassing any per-instance override: what a
        rule runs where it leaves a call unchanged (inference under ``no_grad``).

        An adapter overrides it where the class's forward cannot run here but an equal torch computation
        can (a SpikingJelly neuron with ``backend='cupy'`` on a machine or tensor without CuPy).

        :param x: the call's input (``[B, ...]``, or ``[T, B, ...]`` in multi-step mode)
        """
        return type(self.module).forward(self.module, x, *args, **kwargs)

    def run_steps(self, x_seq: torch.Tensor, before_step: Callable[[], None]) -> torch.Tensor:
        """Run a multi-step call one step at a time, calling ``before_step()`` before each step.

        :param x_seq: ``[T, B, ...]``
        :return: the outputs stacked along time, ``[T, B, ...]``
        """
        outputs = []
        for x in x_seq:
            before_step()
            outputs.append(self.single_step(x))
        return stack_steps(outputs)

    def fused_sltt_multi_step(self, x_seq: torch.Tensor) -> Optional[torch.Tensor]:
        """Run one multi-step call with SLTT's temporal cut as a single fused operation, or decline.

        An adapter overrides this for neurons whose multi-step forward it can reproduce exactly (see
        :mod:`snn_localrules.functional.sltt_multistep`). It must give the same outputs and the same
        SLTT gradients as :meth:`run_steps` with the state cut before every step, and leave the
        module's state as the module's own multi-step forward does.

        :param x_seq: ``[T, B, ...]``
        :return: the outputs ``[T, B, ...]``, or ``None`` when this neuron, as configured now, has no
            fused form (the rule then runs it step by step). Default: ``None``.
        """
        return None

    def passes_no_gradient(self) -> Optional[str]:
        """Why this neuron, as it is set now, passes no gradient to its input, and how to change that; None
        when it passes one (the default). Rules that train through the neurons (online SLTT, TP) refuse to
        step while a neuron says why here, rather than train only the layers after it: a neuron whose eval
        mode runs a Heaviside without surrogate, say."""
        return None

    def describe(self) -> str:
        """A short human-readable description used in listings and error messages."""
        return f"{self.framework}.{type(self.module).__name__}"
