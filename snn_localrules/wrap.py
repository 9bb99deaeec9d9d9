"""Wrapping: find the neuron modules of a model through the adapter hooks, let a rule install its
hooks, and take everything off again.

Nothing here knows a framework or a rule. The model's modules, classes, parameters and buffers are never
replaced: a rule only adds forward hooks and, for multi-step neurons, a per-instance ``forward``; both are
recorded in a :class:`ModuleHooks` and removed by :func:`unwrap`.
"""
from __future__ import annotations

import difflib
import inspect
import threading
import types
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn

from .adapter import NeuronAdapter
from .errors import PluginError, SLRError, UnsupportedModelError, WrapError
from .plugins import neurons as supported_neurons
from .plugins import plugin_manager, rule_registry

_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
# wrap/unwrap from several threads (a thread pool of trials): _WRAPPED is read and changed under this lock
_LOCK = threading.RLock()
_REGISTRATION_HOOK: Optional[Any] = None

# class-name fragments that suggest a module is a neuron nobody answered for (used in error hints only)
_NEURON_NAME_HINTS = ("node", "neuron", "leaky", "lif", "spiking", "synaptic")


# every hook id and per-instance forward function snn-localrules ever installed: a copy.deepcopy of a
# wrapped model carries them (same ids, the same functions rebound), and unwrap() finds them there
_HOOK_IDS: set = set()
_FORWARD_FUNCTIONS: "weakref.WeakSet[Callable]" = weakref.WeakSet()
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class ModuleHooks:
    """Everything a rule changed on a model, so that :meth:`remove` restores it exactly."""

    def __init__(self) -> None:
        self._handles: list = []
        self._forwards: List[nn.Module] = []

    def pre_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._keep(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def forward_hook(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> Any:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._keep(handle)
        return handle

    def _keep(self, handle: Any) -> None:
        self._handles.append(handle)
        _HOOK_IDS.add(handle.id)

    def replace_forward(self, module: nn.Module, fn: Callable) -> None:
        """Give ``module`` a per-instance ``forward``: ``fn(module, *args, **kwargs)`` bound to it (its class
        is untouched). Bound, so that ``copy.deepcopy`` of the model binds the copy's forward to the copy."""
        if "forward" in vars(module):
            raise WrapError(
                f"{type(module).__name__} already has a per-instance forward (set by other code); "
                "snn-localrules will not overwrite it. Remove it, or wrap a model without it."
            )
        object.__setattr__(module, "forward", types.MethodType(fn, module))
        _FORWARD_FUNCTIONS.add(fn)
        self._forwards.append(module)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._forwards:
            if "forward" in vars(module):
                object.__delattr__(module, "forward")
        self._forwards.clear()


def _looks_like_neuron(module: nn.Module) -> bool:
    """A class name or attribute of a neuron. A module with children (a container, or a neuron that holds
    its surrogate function or a linear map as a child) needs more: ``SpikingVGG`` names no neuron."""
    if type(module).__module__.startswith("torch."):
        return False  # torch's own modules (nn.Threshold has a ``threshold`` too) are no neurons
    named = any(hint in type(module).__name__.lower() for hint in _NEURON_NAME_HINTS)
    has = {attr for attr in ("v_threshold", "threshold", "mem") if hasattr(module, attr)}
    if not list(module.children()):
        return named or bool(has)
    # with children: SpikingJelly's v_threshold, a threshold and a membrane, or a neuron's name and one of
    # them (a pruner's threshold alone, or a block of memory tokens, is no neuron)
    return "v_threshold" in has or {"threshold", "mem"} <= has or (named and bool(has))


def find_neurons(model: nn.Module) -> List[NeuronAdapter]:
    """Ask the plugins about every module of ``model``; return the adapters of the neurons found.

    Each module is asked once (a neuron module used at two places in the model is one neuron).

    :raises UnsupportedModelError: no module of the model is a neuron any installed plugin knows.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"wrap() needs a torch.nn.Module, got {type(model).__name__}."
        )
    hook = plugin_manager().hook.slr_neuron_adapter
    found: List[NeuronAdapter] = []
    suspects: List[str] = []
    for name, module in model.named_modules():
        where = f"module {name or '<model>'!r} ({type(module).__module__}.{type(module).__name__})"
        try:
            adapter = hook(module=module)
        except UnsupportedModelError as error:  # a plugin knows the module and refuses it: say where it is
            raise UnsupportedModelError(f"module {name or '<model>'!r}: {error}") from error
        except SLRError:
            raise
        except Exception as error:  # a plugin's own bug: say which module it was asked about
            raise PluginError(
                f"a plugin's slr_neuron_adapter failed on {where}: {type(error).__name__}: {error}. A plugin "
                "that cannot support a module raises UnsupportedModelError with the reason, or returns None."
            ) from error
        if adapter is not None and not isinstance(adapter, NeuronAdapter):
            raise PluginError(
                f"a plugin's slr_neuron_adapter answered {adapter!r} for {where}; it must return an instance "
                "of snn_localrules.NeuronAdapter bound to the module (MyAdapter(module)) or None."
            )
        if adapter is not None:
            found.append(adapter)
        elif module is not model and _looks_like_neuron(module):
            suspects.append((module, f"{name or '<model>'} ({type(module).__module__}.{type(module).__name__})"))
    # a module inside a supported neuron (its surrogate function, a LeakyKReLU, say) is part of that neuron;
    # not so inside a recurrent container (is_layer False), whose wrapped neuron may be unsupported
    parts = {id(sub) for adapter in found if adapter.is_layer for sub in adapter.module.modules()}
    # of nested look-alikes (a block with a threshold around a neuron) the innermost is the neuron, and a
    # module holding a supported neuron is no neuron either
    nested = {id(module) for module, _ in suspects} | {id(adapter.module) for adapter in found}
    suspects = [label for module, label in suspects if id(module) not in parts
                and not any(id(sub) in nested for sub in module.modules() if sub is not module)]
    if found and suspects:
        # one unsupported neuron beside supported ones would keep its temporal route: say so
        warnings.warn(
            f"these modules look like spiking neurons but no plugin supports their class, so "
            f"snn-localrules leaves them as they are (their state is not cut between time steps): "
            f"{', '.join(suspects)}. If they are neurons, register an adapter for them (see "
            "snn_localrules.NeuronAdapter and the plugin docs); if not, ignore this warning.",
            UserWarning, stacklevel=3,
        )
    if not found:
        per_framework: dict = {}
        for info in supported_neurons():
            per_framework[info.framework] = per_framework.get(info.framework, 0) + 1
        known = ", ".join(f"{fw} ({n} classes)" for fw, n in sorted(per_framework.items())) or "none"
        hint = (
            f" These modules look like neurons but no plugin supports their class: {', '.join(suspects)}. "
            "Register an adapter for them (see snn_localrules.NeuronAdapter and the plugin docs)."
            if suspects
            else ""
        )
        raise UnsupportedModelError(
            f"no spiking neuron layer found in {type(model).__name__}: snn-localrules needs at least one "
            f"neuron module of a supported class (installed adapters: {known}; slr.neurons() lists them).{hint}"
        )
    return found


def _wrapped_items() -> List[tuple]:
    with _LOCK:
        return list(_WRAPPED.items())


#: what a module put into a wrapped model is, and what would become of it: see :func:`unknown_modules`
_ADDED = {
    "neuron": ("a spiking neuron", "its state would keep its time route (BPTT's gradient, or a backward through a "
                                   "freed graph)"),
    "whole": ("a layer that must get whole sequences", "it would get part of a sequence per call"),
}


def unknown_modules(learner: Any, tree: nn.Module) -> List[tuple]:
    """``(name in tree, module, kind)`` for the modules of ``tree`` that ``learner`` would have to drive and
    cannot: neurons it did not find at wrap time, and, for a learner that cuts other layers' carried state
    between its calls (online SLTT, TP: their ``_carried``), layers that must get whole sequences (the
    plugins' ``slr_whole_sequence_modules``) it did not see at wrap time. (Stateful layers it takes on:
    :func:`new_carried`, its ``_adopt_carried``.)"""
    known = {id(n.module) for n in learner.neurons}
    named = list(tree.named_modules())
    found = [(name, m, "neuron") for name, m in named if id(m) not in known and _is_neuron(m)]
    if getattr(learner, "_carried", None) is None:
        return found
    names = {id(m): name for name, m in named}
    seen = getattr(learner, "_structure", set())
    found += [(names.get(id(m), ""), m, "whole")
              for answer in plugin_manager().hook.slr_whole_sequence_modules(model=tree, neurons=learner.neurons)
              for m, _ in (answer or ()) if m not in seen]
    return found


def new_carried(learner: Any, tree: nn.Module) -> List[Any]:
    """The plugins' holders of state carried between steps (``slr_carried_state``) in ``tree`` whose state
    an online learner does not cut yet (layers put into the model after it was wrapped)."""
    carried = getattr(learner, "_carried", None)
    if carried is None:
        return []
    skip = {id(holder.module) for holder in carried} | {id(n.module) for n in learner.neurons}
    found = [h for answer in plugin_manager().hook.slr_carried_state(model=tree, neurons=learner.neurons)
             for h in (answer or ())]
    for holder in found:
        check_carried_holder(holder)
    return [h for h in found if id(h.module) not in skip]


def check_carried_holder(holder: Any) -> None:
    """A plugin's ``slr_carried_state`` answer must name the module that keeps the state."""
    if not isinstance(getattr(holder, "module", None), nn.Module):
        raise PluginError(
            f"a plugin's slr_carried_state answered a {type(holder).__name__} without a 'module' attribute "
            "naming the nn.Module that keeps the state; the learner cuts the state before each call of "
            "that module. Give each answer a .module (a NeuronAdapter for the module has one)."
        )


def neuron_change_error(model: nn.Module, learner: Any, added: List[tuple], removed: List[Any]) -> WrapError:
    """The error for modules put into (``(name, module, kind)``, :func:`unknown_modules`) or neurons taken
    from (adapters) a wrapped model."""
    if added:
        name, module, kind = added[0]
        what, fate = _ADDED[kind]
        what = (f"module {name!r} ({type(module).__module__}.{type(module).__name__}) is {what} put into this "
                f"{type(model).__name__} after it was wrapped: the {learner.name!r} learner does not know it, so "
                f"{fate}")
    else:
        what = (f"{removed[0].describe()} was wrapped but is no longer in this {type(model).__name__} (removed or "
                "replaced after wrapping)")
    return WrapError(
        f"{what}. Change a model's neurons while it is unwrapped: learner.unwrap(), change it, then wrap it again "
        "(the learner's optimizer and options may be passed again as they were). In a list put in at once "
        "(Sequential.extend), the modules before that one are in."
    )


def _is_neuron(module: nn.Module) -> bool:
    """Whether a plugin takes ``module`` for a neuron (one it refuses is a neuron too)."""
    try:
        return plugin_manager().hook.slr_neuron_adapter(module=module) is not None
    except UnsupportedModelError:
        return True
    except Exception:
        return False  # a plugin's bug is said at the next wrap, not in the user's model building


def _on_registration(parent: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    """torch's global module-registration hook (``setattr``, ``add_module``, ``Sequential.append``,
    ``net[i] = ...``): a neuron put into a wrapped model is refused before it lands there."""
    if submodule is None or not _WRAPPED:
        return None
    for model, learner in _wrapped_items():
        parts = getattr(learner, "_structure", None)  # the model's modules, kept by the learner
        if not (parent in parts if parts is not None else any(m is parent for m in model.modules())):
            continue
        added = unknown_modules(learner, submodule)
        holders = new_carried(learner, submodule)
        if added or holders:
            prefix = next((n for n, m in model.named_modules() if m is parent), None)
            if prefix is None:  # a module taken out of the model since: no longer the learner's
                if parts is not None:
                    parts.discard(parent)
                continue
        if added:
            prefix = ".".join(filter(None, [prefix, name]))
            raise neuron_change_error(model, learner, [(".".join(filter(None, [prefix, n])), m, kind)
                                                       for n, m, kind in added], [])
        if holders:  # a SynapseFilter, a dropout mask: its state is cut at each call, as the others'
            learner._adopt_carried(holders)
        if parts is not None:
            parts.update(submodule.modules())  # a neuron put into this new block later is found too
    return None


def _watch_registrations() -> None:
    global _REGISTRATION_HOOK
    register = getattr(nn.modules.module, "register_module_module_registration_hook", None)
    with _LOCK:
        if _REGISTRATION_HOOK is None and register is not None:
            _REGISTRATION_HOOK = register(_on_registration)


def learner_of(model: nn.Module) -> Optional[Any]:
    """The learner currently wrapping ``model``, or ``None``."""
    with _LOCK:
        return _WRAPPED.get(model)


def wrap(model: nn.Module, rule: str = "sltt", **options: Any):
    """Train ``model`` with a memory-frugal rule, without changing its code.

    :param model: a SpikingJelly or snnTorch model (any ``nn.Module`` holding supported neurons).
    :param rule: name of the rule; :func:`snn_localrules.rules` lists them (``"sltt"``, ...).
    :param options: passed to the rule (for SLTT: ``optimizer``, ``loss``, ``K``, ``seed``, ...).
    :return: the learner (a :class:`snn_localrules.rules.Rule`); ``learner.unwrap()`` undoes the wrapping.
    :raises WrapError: the model is already wrapped, or an option is wrong.
    :raises UnsupportedModelError: the model holds no supported neuron.

    If anything fails, the model is left exactly as it was. Wrapping and unwrapping are safe from several
    threads (one at a time).
    """
    with _LOCK:  # the "already wrapped" checks and the record of this learner, as one
        learner = _wrap(model, rule, options)
    _watch_registrations()
    return learner


def _wrap(model: nn.Module, rule: str, options: Dict[str, Any]) -> Any:
    if isinstance(model, nn.Module) and model in _WRAPPED:
        raise WrapError(
            f"this {type(model).__name__} is already wrapped by rule {_WRAPPED[model].name!r}; "
            "call slr.unwrap(model) (or learner.unwrap()) before wrapping it again."
        )
    registry = rule_registry()
    if not isinstance(rule, str) or rule not in registry:
        raise WrapError(f"unknown rule {rule!r}; installed rules: {', '.join(sorted(registry))}.")
    _check_option_names(rule, registry, options)
    neurons = find_neurons(model)
    _check_not_wrapped_elsewhere(model, neurons)
    if _copied_hook_modules(model):
        raise WrapError(
            f"this {type(model).__name__} carries the hooks of a wrapped model it was copied from "
            "(copy.deepcopy of a wrapped model); call slr.unwrap(copy) first, then wrap it."
        )
    learner = registry[rule](model, neurons, **options)  # validates options; touches nothing
    learner.name = rule  # a subclass registered under its own name is that rule (messages, checkpoints)
    try:
        learner._install()
    except BaseException:
        learner._remove()
        raise
    _WRAPPED[model] = learner
    return learner


def _check_not_wrapped_elsewhere(model: nn.Module, neurons: List[NeuronAdapter]) -> None:
    """A neuron already driven by the learner of another model (a parent of ``model``, a slice such as
    ``net[:3]`` sharing its modules) would get a second set of hooks: refuse, naming that model."""
    owners = {id(n.module): (other_model, learner) for other_model, learner in _wrapped_items()
              for n in learner.neurons}
    for neuron in neurons:
        owner = owners.get(id(neuron.module))
        if owner is not None:
            other_model, learner = owner
            raise WrapError(
                f"{neuron.describe()} of this {type(model).__name__} is already wrapped by rule "
                f"{learner.name!r} as part of another {type(other_model).__name__} (a model that shares its "
                "modules: a parent, or a slice such as net[:3]); unwrap that one first "
                "(slr.unwrap(other_model) or its learner.unwrap())."
            )


def unwrap(model: nn.Module) -> nn.Module:
    """Undo :func:`wrap`: remove every hook and per-instance forward it installed; the model is given
    back as it was (wrapping changes no class, parameter, buffer or step mode).

    :return: the same model object.
    :raises WrapError: the model is not wrapped.
    """
    learner = learner_of(model) if isinstance(model, nn.Module) else None
    if learner is None:
        if isinstance(model, nn.Module) and _strip_copied_hooks(model):
            return model  # a deep copy of a wrapped model: what the copy carried is gone
        raise WrapError(f"this {type(model).__name__} is not wrapped by snn-localrules; nothing to unwrap.")
    learner.unwrap()
    return model


def _strip_copied_hooks(model: nn.Module) -> bool:
    """Remove the hooks and per-instance forwards that a ``copy.deepcopy`` of a wrapped model carried
    along (an EMA teacher, a best-model snapshot). Returns whether there were any."""
    live = {id(m): owner for owner, _ in _wrapped_items() for m in owner.modules()}
    found = False
    for module in _copied_hook_modules(model):
        if id(module) in live:
            raise WrapError(
                f"this {type(model).__name__} is part of a {type(live[id(module)]).__name__} that is wrapped; "
                "unwrap that model (slr.unwrap(model) or learner.unwrap())."
            )
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if isinstance(hooks, dict):
                for key in [k for k in hooks if k in _HOOK_IDS]:
                    del hooks[key]
        if _has_own_forward(module):
            object.__delattr__(module, "forward")
        found = True
    return found


def _has_own_forward(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ in _FORWARD_FUNCTIONS


def _copied_hook_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that carry hooks or a per-instance forward snn-localrules installed (on
    them, or on the model a deep copy was made of)."""
    return [m for m in model.modules()
            if _has_own_forward(m) or any(key in _HOOK_IDS for name in _HOOK_DICTS for key in getattr(m, name, {}))]


def _option_names(cls: type) -> Optional[List[str]]:
    """The keyword options of a rule class, or None when its ``__init__`` takes any (``**kwargs``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, model, neurons
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _check_option_names(rule: str, registry: Dict[str, type], options: Dict[str, Any]) -> None:
    known = _option_names(registry[rule])
    if known is None:
        return
    for name in options:
        if name in known:
            continue
        elsewhere = sorted(r for r, cls in registry.items() if r != rule and name in (_option_names(cls) or ()))
        hint = difflib.get_close_matches(name, known, n=1)
        raise WrapError(
            f"rule {rule!r} has no option {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + (f"; it is an option of rule {', '.join(map(repr, elsewhere))}" if elsewhere else "")
            + f". Options of {rule!r}: {', '.join(known)}."
        )


def _remember(model: nn.Module, learner: Any) -> None:
    """Record ``learner`` as the one wrapping ``model`` (a deep copy of a learner wraps its model's copy)."""
    with _LOCK:
        _WRAPPED[model] = learner


def _forget(model: nn.Module) -> None:
    global _REGISTRATION_HOOK
    with _LOCK:
        _WRAPPED.pop(model, None)
        if not _WRAPPED and _REGISTRATION_HOOK is not None:  # nothing wrapped: torch's registrations run bare
            _REGISTRATION_HOOK.remove()
            _REGISTRATION_HOOK = None
