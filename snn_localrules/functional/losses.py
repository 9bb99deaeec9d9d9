"""Per-time-step losses for online training.

An online rule backpropagates the loss of each step as soon as the step is done, so the training loss
must be a sum of per-step terms, ``L = (1/T) sum_t L_t(o[t], y)``. This module turns what the user passes
as ``loss=`` into the per-step term ``L_t``; the rule divides by T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import LossError, SLRError

StepLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: the SLTT authors' mix: L_t = (1 - alpha) CE(o[t], y) + alpha MSE(o[t], phi), phi all ones (their
#: default, ``loss_means``) or the one-hot label (their ``-mse_n_reg``, used for DVS-CIFAR10)
SLTT_MSE_WEIGHT = 0.05
SLTT_MSE_TARGET = 1.0


@dataclass(frozen=True)
class StepLoss:
    """A loss in per-step form.

    :param fn: ``fn(o_t, y) -> scalar`` for one step; ``o_t`` is ``[B, C]``, ``y`` is ``[B]`` class indices.
    :param name: shown in reprs and errors.
    :param output_index: which element of a tuple model output the loss wants (``None``: no preference;
        snnTorch membrane losses want the membrane, the last element of ``(spk, [syn, ...] mem)``: -1).
    :param user: the user's own callable (whose failure at its first call is likely a loss written for the
        whole sequence: :func:`step_loss_error`), not a named or a framework's loss.
    """

    fn: StepLossFn
    name: str
    output_index: Optional[int] = None
    user: bool = False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)


def _one_hot_like(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dtype.is_floating_point and target.shape == output.shape:
        return target
    return F.one_hot(target.long(), output.shape[-1]).to(output.dtype)


def cross_entropy_step(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE of one step's output against class indices."""
    return F.cross_entropy(output, target)


def mse_step(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of one step's output against the one-hot target."""
    return F.mse_loss(output, _one_hot_like(output, target))


def ce_mse_step(
    output: torch.Tensor,
    target: torch.Tensor,
    alpha: float = SLTT_MSE_WEIGHT,
    phi: float = SLTT_MSE_TARGET,
) -> torch.Tensor:
    """The SLTT authors' default loss for one step: ``(1 - alpha) CE(o, y) + alpha MSE(o, phi)``, phi = 1."""
    mse = F.mse_loss(output, torch.full_like(output, phi))
    return (1.0 - alpha) * F.cross_entropy(output, target) + alpha * mse


def ce_mse_onehot_step(output: torch.Tensor, target: torch.Tensor, alpha: float = SLTT_MSE_WEIGHT) -> torch.Tensor:
    """The SLTT authors' DVS-CIFAR10 loss for one step (their ``-mse_n_reg``): ``(1 - alpha) CE(o, y) +
    alpha MSE(o, one_hot(y))``."""
    return (1.0 - alpha) * F.cross_entropy(output, target) + alpha * F.mse_loss(output, _one_hot_like(output, target))


NAMED_LOSSES = {"ce": cross_entropy_step, "mse": mse_step, "ce+mse": ce_mse_step, "ce+mse_onehot": ce_mse_onehot_step}


def resolve_step_loss(loss: Union[str, Callable, StepLoss], plugin_answer=None) -> StepLoss:
    """Resolve ``loss=`` to a :class:`StepLoss`.

    :param loss: ``"ce"``, ``"mse"``, ``"ce+mse"``, ``"ce+mse_onehot"``, a :class:`StepLoss`, a framework loss object that a
        plugin recognises, or any callable ``(o_t, y) -> scalar`` (applied per step; the rule divides by T).
    :param plugin_answer: a callable asking the plugins (``slr_step_loss`` hook); injected to keep this
        module free of the plugin manager.
    """
    if isinstance(loss, StepLoss):
        return loss
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise LossError(
                f"unknown loss {loss!r}; use one of {', '.join(repr(k) for k in NAMED_LOSSES)} "
                "or a callable (o_t, y) -> scalar applied to each time step."
            )
        return StepLoss(NAMED_LOSSES[loss], loss)
    if plugin_answer is not None:
        answer = plugin_answer(loss)
        if isinstance(answer, StepLoss):
            return answer
        if answer is not None:
            from ..errors import PluginError

            raise PluginError(
                f"a plugin's slr_step_loss answered {type(answer).__name__} for the loss "
                f"{type(loss).__name__}; it must return a snn_localrules.functional.losses.StepLoss "
                "(StepLoss(fn, name), fn(o_t, y) -> scalar) or None."
            )
    if callable(loss):
        return StepLoss(loss, getattr(loss, "__name__", type(loss).__name__), user=True)
    raise LossError(f"loss must be a name or a callable (o_t, y) -> scalar, got {type(loss).__name__}.")


def step_loss_error(step_loss: StepLoss, out: torch.Tensor, target: torch.Tensor, error: Exception) -> LossError:
    """A per-step loss failed: name the shapes it was given, since a loss written for the whole sequence
    (``CE(out.mean(0), y)``, a ``[B, T, C]`` TET loss) fails on one step's output in torch's own words."""
    return LossError(
        f"the loss {step_loss.name} failed on one time step's output {tuple(out.shape)} and labels "
        f"{tuple(target.shape)}: {type(error).__name__}: {error}. An online rule calls the loss once per step, "
        "loss(o_t, y) with o_t one step's output [B, C], not the sequence [T, B, C] or its mean over time; "
        "write it for one step (the rule averages over the steps), or keep a loss of the whole sequence in "
        "zero-change mode (slr.wrap(model, rule='sltt') and your own loop)."
    )


def evaluate_step_loss(step_loss: StepLoss, out: torch.Tensor, target: torch.Tensor, t: int, first: bool = False,
                       explain: Optional[Callable[[Exception], None]] = None) -> torch.Tensor:
    """``step_loss(out, target)`` at step ``t``, as a 0-d tensor. When the loss fails, ``explain(error)`` may
    raise a clearer error first (the online driver's label check); at its ``first`` call a user's own callable
    gets :func:`step_loss_error`. A result that is not one number is a :class:`LossError`."""
    try:
        loss = step_loss(out, target)
    except (SLRError, torch.cuda.OutOfMemoryError):
        raise
    except (IndexError, RuntimeError, TypeError, ValueError) as error:
        if explain is not None:
            explain(error)
        if first and step_loss.user:  # one written for the whole sequence fails at once
            raise step_loss_error(step_loss, out, target, error) from error
        raise
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise LossError(
            f"the loss {step_loss.name} returned {getattr(loss, 'shape', type(loss).__name__)} at step {t}; "
            "a per-step loss must return a scalar (use reduction='mean' or 'sum')."
        )
    return loss.reshape(())
