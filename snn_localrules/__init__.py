"""snn-localrules: train unchanged SpikingJelly and snnTorch models with memory-frugal rules.

>>> import snn_localrules as slr
>>> learner = slr.wrap(model, rule="sltt")                                   # zero-change mode
>>> learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce", K=2)    # online SLTT-K
>>> stats = learner.step(x_seq, y)                                           # x_seq: [T, B, ...]
>>> learner.unwrap()
"""
import importlib.util as _util
import os as _os
import sys as _sys


def _adapters_of_a_source_checkout() -> None:
    """Run from a source checkout that is not installed (``PYTHONPATH=<checkout>``, as on a machine where
    nothing may be installed), the ``adapters/`` folder beside this package is made its ``adapters``
    subpackage, as ``setup.cfg``'s ``package_dir`` maps it in an install. Installed (editable or not),
    the subpackage is found as usual and nothing is done. Only the folder's ``__init__`` (a docstring)
    runs here; each adapter module is still imported when its plugin is loaded."""
    if _util.find_spec(__name__ + ".adapters") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "adapters")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _util.spec_from_file_location(__name__ + ".adapters", init, submodule_search_locations=[folder])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_adapters_of_a_source_checkout()

from ._version import __version__  # noqa: E402
from .adapter import NeuronAdapter, NeuronInfo  # noqa: E402
from .errors import (  # noqa: E402
    LayoutError,
    LossError,
    NonFiniteLossError,
    OnlineLossWarning,
    PluginError,
    SLRError,
    UnsupportedModelError,
    WrapError,
)
from .hookspecs import hookimpl, hookspec  # noqa: E402
from .plugins import neurons, plugin_manager, register_plugin, rules, unregister_plugin  # noqa: E402
from .wrap import find_neurons, learner_of, unwrap, wrap  # noqa: E402
from .diagnose import Diagnosis, SLTTApproximationWarning, diagnose  # noqa: E402  (torch only; matplotlib when plotting)
from . import presets  # noqa: E402  (builders import their framework only when called)

__all__ = [
    "__version__",
    "wrap",
    "diagnose",
    "Diagnosis",
    "SLTTApproximationWarning",
    "presets",
    "unwrap",
    "learner_of",
    "find_neurons",
    "rules",
    "neurons",
    "hookimpl",
    "hookspec",
    "plugin_manager",
    "register_plugin",
    "unregister_plugin",
    "NeuronAdapter",
    "NeuronInfo",
    "SLRError",
    "WrapError",
    "UnsupportedModelError",
    "LayoutError",
    "PluginError",
    "LossError",
    "NonFiniteLossError",
    "OnlineLossWarning",
]
