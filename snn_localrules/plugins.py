"""The plugin manager: hook specs, then the built-in plugins, then entry points, then a check.

The framework adapters ship with this package and are declared in the ``snn_localrules`` entry-point
group like any third-party plugin, but they are registered before the entry points are loaded: pluggy
asks later registrations first, so every third-party plugin, wherever its distribution was found, is
asked before them and can take over a framework's class (``firstresult`` hooks). The entry-point names
of the bundled adapters (``spikingjelly``, ``snntorch``) are taken: a third-party entry point of the same
name is not loaded.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Mapping, Optional

import pluggy

from . import hookspecs
from .errors import PluginError

#: entry-point group third-party plugins register under
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
#: plugins inside this package that are always registered
BUILTIN_PLUGINS = ("snn_localrules.rules",)
#: adapters shipped with the package; normally found through their entry points
BUNDLED_ADAPTERS = {
    "spikingjelly": "snn_localrules.adapters.spikingjelly",
    "snntorch": "snn_localrules.adapters.snntorch",
}

_manager: Optional[pluggy.PluginManager] = None


def _build_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    for name, module_name in BUNDLED_ADAPTERS.items():
        pm.register(importlib.import_module(module_name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)  # skips the names registered above
    pm.check_pending()
    return pm


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    if _manager is None:
        _manager = _build_manager()
    return _manager


def register_plugin(plugin: object, name: Optional[str] = None) -> str:
    """Register a plugin object or module at run time (what an entry point does at start-up).

    :return: the name it was registered under, for :func:`unregister_plugin`.
    """
    pm = plugin_manager()
    registered = pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except BaseException:
        pm.unregister(name=registered)  # a plugin with a misspelled hook is not left half registered
        raise
    return registered


def unregister_plugin(plugin: object = None, name: Optional[str] = None) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    plugin_manager().unregister(plugin=plugin, name=name)


def rule_registry() -> Dict[str, type]:
    """All rules the registered plugins provide, ``{name: class}``."""
    registry: Dict[str, type] = {}
    for answer in plugin_manager().hook.slr_rules():
        if not isinstance(answer, Mapping):
            raise PluginError(
                f"a plugin's slr_rules returned {type(answer).__name__}; it must return a mapping "
                "{name: rule class}, e.g. {'my_rule': MyRule}."
            )
        for name, cls in answer.items():
            if name in registry and registry[name] is not cls:
                raise RuntimeError(
                    f"two plugins provide a rule named {name!r} ({registry[name]!r} and {cls!r}); "
                    "unregister one of them"
                )
            registry[name] = cls
    return registry


def rules() -> List[str]:
    """Names of the installed learning rules, sorted."""
    return sorted(rule_registry())


def neurons() -> list:
    """The neuron classes supported by the installed plugins (for importable frameworks)."""
    found = []
    for answer in plugin_manager().hook.slr_neuron_types():
        found.extend(answer)
    return sorted(found, key=lambda info: (info.framework, info.name))
