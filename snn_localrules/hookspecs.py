"""Hook specifications of snn-localrules.

Every point where the core asks a plugin something is one function below. A plugin answers with a
function of the same name marked ``@snn_localrules.hookimpl``. The core calls these hooks while wrapping a
model (once per module) and never in the time loop: the answers are objects whose methods the rule then
calls directly.

Framework adapters (``snn_localrules.adapters.spikingjelly``, ``snn_localrules.adapters.snntorch``) are
plugins registered through the ``snn_localrules`` entry-point group; a third party can add a neuron type
or a rule the same way, or at run time with ``snn_localrules.register_plugin``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

import pluggy
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import NeuronAdapter, NeuronInfo
    from .functional.losses import StepLoss

PROJECT_NAME = "snn_localrules"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def slr_neuron_adapter(module: nn.Module) -> Optional["NeuronAdapter"]:
    """Is ``module`` a spiking neuron this plugin knows? If so, return the adapter for it.

    :param module: one module of the user's model (every module is asked, containers included).
    :return: a :class:`snn_localrules.NeuronAdapter` bound to ``module``, which tells the core how to read,
        detach and reset the neuron's carried state and how to run it one time step; ``None`` when the
        module is not a neuron of this plugin's framework. The first plugin that answers wins, so a more
        specific plugin registered later (pluggy calls later registrations first) can take over a class;
        the bundled SpikingJelly and snnTorch adapters are registered before every entry point, so any
        third-party plugin is asked before them. A plugin that knows the module but cannot support it
        raises :class:`snn_localrules.UnsupportedModelError` with the reason and the fix.
    """


@hookspec
def slr_reset_model(model: nn.Module, neurons: Sequence["NeuronAdapter"]) -> None:
    """Reset the non-neuron state of ``model`` that belongs to this plugin's framework.

    The core resets every neuron through its adapter; this hook is for the rest (SpikingJelly keeps
    dropout masks and other memories in non-neuron modules). Called after every batch of online
    training. Plugins whose framework has no such state do nothing.

    :param model: the wrapped model.
    :param neurons: the adapters found at wrap time.
    """


@hookspec
def slr_carried_state(model: nn.Module, neurons: Sequence["NeuronAdapter"]) -> Sequence[object]:
    """The state ``model`` carries from one time step to the next outside its neurons.

    Asked when an online learner is built, and for a module put into its model afterwards (``model`` is
    then that module): it cuts such state from the graph before every call of the model (through a
    forward pre-hook on the object's ``module``), as it cuts the neurons' state; and with
    ``cuda_graphs=True``, whose replays run no Python, it copies the state into the graph's buffers before
    each replay.

    :param model: the wrapped model.
    :param neurons: the adapters found at wrap time (their state is already covered).
    :return: objects with a ``module`` attribute (the ``nn.Module`` that keeps the state),
        ``get_state() -> {name: value}`` (tensors, numbers, None, or tuples/lists/dicts of them) and
        ``set_state(mapping)`` (a :class:`snn_localrules.NeuronAdapter` for the module has all three),
        one per module that keeps such state (SpikingJelly's ``layer.Dropout`` mask); empty when the
        framework keeps none.
    """


@hookspec
def slr_whole_sequence_modules(model: nn.Module, neurons: Sequence["NeuronAdapter"]) -> Sequence[Tuple[nn.Module, str]]:
    """The modules of ``model`` that must get the whole sequence in every call: their parameters are tied
    to the number of steps (SpikingJelly's temporal-effective batch norm keeps one scale per step; its
    temporal-wise and multi-dimensional attention weigh the T steps of a call), or they compute across
    the steps of each call and carry nothing to the next (SpikingJelly 0.0.0.0.14's multi-step ``Delay``).

    Asked when a learner is built. TP feeds the model one step per call, online SLTT ``chunk`` steps and
    SLTT-K's runs of steps: they refuse such a model (online SLTT takes it with ``chunk`` at least T and
    no ``K``), naming the module; zero-change mode, where the user's loop calls the model on whole
    sequences, takes it.

    :param model: the model being wrapped.
    :param neurons: the adapters found for its neurons.
    :return: ``(module, why)`` pairs, ``why`` completing "<module> ..." (e.g. "keeps one scale per time
        step"); empty when this plugin sees none.
    """


@hookspec(firstresult=True)
def slr_takes_sequences(model: nn.Module, neurons: Sequence["NeuronAdapter"]) -> Optional[bool]:
    """Does ``model`` take a whole ``[T, B, ...]`` sequence per call although none of its neurons runs
    multi-step? (Single-step neurons inside a container that loops over time: SpikingJelly's
    ``MultiStepContainer``, ``SeqToANNContainer``.) Online learners then feed it ``[c, B, ...]`` chunks
    instead of one step ``[B, ...]`` per call; the user's ``multi_step=`` overrides the answer.

    Asked once per learner, the first time it needs to know.

    :param model: the wrapped model.
    :param neurons: the adapters found at wrap time.
    :return: True when a module of this plugin's framework in ``model`` only takes sequences; None when
        this plugin sees none.
    """


@hookspec
def slr_neuron_types() -> Sequence["NeuronInfo"]:
    """List the neuron classes this plugin supports, for :func:`snn_localrules.neurons`.

    :return: a sequence of :class:`snn_localrules.NeuronInfo` (framework, class name, notes). Only
        frameworks that are importable need to be listed.
    """


@hookspec
def slr_rules() -> Mapping[str, type]:
    """Learning rules this plugin provides, by name.

    :return: a mapping ``{name: rule class}``; each class subclasses :class:`snn_localrules.rules.Rule`
        and is built as ``cls(model, neurons, **options)`` by :func:`snn_localrules.wrap`. Names must be
        unique across plugins. The learner takes the name it was wrapped by (``learner.name``: in its
        messages and checkpoints), so a subclass of a built-in rule registered under a new name is a rule
        of its own.
    """


@hookspec(firstresult=True)
def slr_step_loss(loss: object) -> Optional["StepLoss"]:
    """Turn a framework's loss object into its per-time-step form, or refuse it.

    Online rules backpropagate each step's loss at once, so they need L = (1/T) sum_t L_t. A framework
    plugin recognises its own loss objects here (snnTorch's ``SF.ce_rate_loss()``, ...).

    :param loss: what the user passed as ``loss=`` (not a string: names are resolved by the core).
    :return: a :class:`snn_localrules.functional.losses.StepLoss`, or ``None`` if the object is not
        this plugin's.
    :raises snn_localrules.errors.LossError: the object is this plugin's but cannot be split per step;
        the message says why and what to use instead.
    """
