"""Exceptions raised by snn-localrules.

Every error names the problem and the fix. They subclass the built-in exception a user would expect
(``ValueError`` for bad arguments, ``TypeError`` for unsupported objects, ``FloatingPointError`` for a
non-finite loss), so ``except ValueError`` in existing code keeps working.
"""


class SLRError(Exception):
    """Base class of every error raised by snn-localrules."""


class WrapError(SLRError, ValueError):
    """The model cannot be wrapped (or unwrapped) as asked."""


class UnsupportedModelError(SLRError, TypeError):
    """The model, or one of its modules, is of a kind the installed plugins do not support."""


class LayoutError(SLRError, ValueError):
    """An input tensor does not have the layout the learner needs (time-first ``[T, B, ...]``)."""


class LossError(SLRError, ValueError):
    """The loss cannot be used by the rule (for example, it is not decomposable per time step)."""


class NonFiniteLossError(SLRError, FloatingPointError):
    """A loss came out NaN or infinite; the batch was abandoned and nothing was updated."""


class PluginError(SLRError, RuntimeError):
    """A plugin answered a hook with something the core cannot use; the message names the hook and the fix."""


class BackendError(SLRError, RuntimeError):
    """A compute backend (e.g. CuPy kernels) was asked for but cannot run here."""


class OnlineLossWarning(UserWarning):
    """Online training would not do what the user's code means: a model that reduces its output over time
    other than by a mean is trained on each step's output; a forward that loops over time itself is called
    once per step."""
