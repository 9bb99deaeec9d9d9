"""Is SLTT a good approximation of BPTT for this model? Compare both gradients on one batch.

``slr.diagnose(model, x_seq, y)`` computes, on the model as it is, the full BPTT gradient (plain autograd
through time) and the SLTT gradient (the same forward and loss with the model wrapped in zero-change SLTT
mode, i.e. every neuron's carried state cut at every step), and reports per parameterised module the
cosine similarity and the norm ratio of the two, and what autograd has to keep for each. It warns with
:class:`SLTTApproximationWarning` when a layer's cosine falls below a threshold (default
:data:`POOR_COSINE` = 0.7): slow-decaying neurons (LIF with a large tau, snnTorch ``beta`` close to 1) and
two-state neurons (snnTorch ``Synaptic``) are the known cases.

The model is left as it was: parameters, buffers (BN running statistics), ``.grad``, hooks, step modes
and torch's random state are those from before the call; the neurons' carried state is reset.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .adapter import NeuronAdapter
from .errors import LossError, WrapError
from .functional.losses import StepLoss, evaluate_step_loss, resolve_step_loss
from .memory import SavedBytes, storage_keys
from .plugins import plugin_manager
from .rules.base import (
    OutputChoice,
    buffer_copies,
    check_devices,
    check_neurons_pass_gradients,
    check_output_choice,
    check_sequence_batch,
    probe_reduces_time,
    restore_buffers,
    rng_states,
    run_in_time,
    set_rng_states,
)
from .wrap import find_neurons, learner_of, wrap

#: below this cosine similarity (in any layer) SLTT is reported as a poor approximation of BPTT. Per-layer
#: cosines are lower than the whole-model figure (the readout's exact gradient dominates that one) and
#: lowest in the first layer. Measured with this function on a 2-conv net (T=8, B=16, random event input,
#: 3 seeds; lowest layer / whole model): SpikingJelly LIF tau=1.1: 0.99 / 1.00; tau=2: 0.76-0.78 / 0.98-0.99;
#: tau=4: 0.50-0.63 / 0.94-0.97; IF: 0.33-0.43 / 0.89-0.94; snnTorch Leaky beta=0.5: 0.95 / 0.99;
#: Synaptic alpha=0.8, beta=0.9: 0.37-0.69 / 0.77-0.87. 0.7 passes the fast-decaying neurons SLTT is known
#: to train well (LIF tau=2, the papers' choice) and flags slow or two-state ones.
POOR_COSINE = 0.7


class SLTTApproximationWarning(UserWarning):
    """SLTT's gradient points away from BPTT's in some layer (cosine below the diagnosis threshold)."""


@dataclass
class LayerGradient:
    """The BPTT and SLTT gradients of one parameterised module.

    :ivar name: the module's name in ``model.named_modules()`` (``"<model>"`` for the model's own).
    :ivar kind: the module's class name.
    :ivar numel: number of trainable parameter elements (each parameter is counted in the first module
        that holds it).
    :ivar cosine: cosine similarity of the flattened gradients; 0.0 when exactly one of them is zero (one
        rule gives the layer nothing), NaN when both are zero (nothing to compare).
    :ivar norm_ratio: ``|g_sltt| / |g_bptt|`` (inf when only BPTT's is zero, NaN when both are).
    :ivar bptt_norm: ``|g_bptt|``; :ivar sltt_norm: ``|g_sltt|``.
    """

    name: str
    kind: str
    numel: int
    cosine: float
    norm_ratio: float
    bptt_norm: float
    sltt_norm: float


@dataclass
class Diagnosis:
    """What :func:`diagnose` found. ``str(diagnosis)`` is :meth:`table` plus the verdict.

    :ivar layers: one :class:`LayerGradient` per parameterised module, in model order.
    :ivar cosine: cosine similarity of the whole-model gradients; :ivar norm_ratio: their norm ratio.
    :ivar loss: the batch loss ``(1/T) sum_t L_t`` (the same in both passes: the cut changes only backward).
    :ivar T: time steps; :ivar batch_size: samples.
    :ivar bptt_saved_bytes: bytes autograd saves for backward over a full BPTT forward of the batch (all
        T steps).
    :ivar sltt_step_saved_bytes: the most bytes autograd saves for one step of online SLTT (the model
        wrapped, one step per forward, each step's graph freed before the next), the largest over the T
        steps; ``None`` when the model's own forward owns the time loop (no online mode).
    :ivar threshold: the cosine below which a layer counts as poorly approximated.
    :ivar poor_layers: names of those layers; :ivar poor: ``bool(poor_layers)``.
    """

    layers: List[LayerGradient]
    cosine: float
    norm_ratio: float
    loss: float
    T: int
    batch_size: int
    bptt_saved_bytes: int
    sltt_step_saved_bytes: Optional[int]
    threshold: float
    poor_layers: List[str] = field(default_factory=list)

    @property
    def poor(self) -> bool:
        """True when SLTT is a poor approximation of BPTT in at least one layer."""
        return bool(self.poor_layers)

    @property
    def memory_ratio(self) -> Optional[float]:
        """``sltt_step_saved_bytes / bptt_saved_bytes``: what online SLTT keeps relative to BPTT."""
        if self.sltt_step_saved_bytes is None or not self.bptt_saved_bytes:
            return None
        return self.sltt_step_saved_bytes / self.bptt_saved_bytes

    def table(self, fmt: str = "markdown") -> str:
        """The per-layer figures as a table: ``fmt="markdown"`` or ``"plain"`` (aligned columns). Columns:
        cosine of the SLTT and BPTT gradients, norm ratio ``|g_sltt| / |g_bptt|``, both norms; layers below
        the threshold are marked ``(!)``; the last row is the whole model."""
        if fmt not in ("markdown", "plain"):
            raise ValueError(f"fmt must be 'markdown' or 'plain', got {fmt!r}.")
        header = ["layer", "type", "params", "cosine", "norm ratio", "norm BPTT", "norm SLTT"]  # no "|": markdown
        rows = [
            [r.name + (" (!)" if r.name in self.poor_layers else ""), r.kind, str(r.numel), f"{r.cosine:.4f}",
             f"{r.norm_ratio:.4f}", f"{r.bptt_norm:.3e}", f"{r.sltt_norm:.3e}"]
            for r in self.layers
        ]
        total_numel = sum(r.numel for r in self.layers)
        rows.append(["all", "", str(total_numel), f"{self.cosine:.4f}", f"{self.norm_ratio:.4f}", "", ""])
        if fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
            lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
        return "\n".join(lines)

    def ratio_range(self) -> str:
        """The layers' norm ratios ``|g_sltt| / |g_bptt|``, smallest to largest, as text."""
        ratios = [r.norm_ratio for r in self.layers if math.isfinite(r.norm_ratio)]
        return f"norm ratios {min(ratios):.3g} to {max(ratios):.3g}" if ratios else "no norm ratio"

    def summary(self) -> str:
        """Memory and verdict in a few lines."""
        lines = [f"batch: T={self.T}, B={self.batch_size}, loss {self.loss:.4f}"]
        if self.sltt_step_saved_bytes is None:
            lines.append(f"autograd saves {_mb(self.bptt_saved_bytes)} for BPTT over T={self.T}; online SLTT "
                         "is not available for this model (its forward owns the time loop)")
        else:
            lines.append(
                f"autograd saves {_mb(self.bptt_saved_bytes)} for BPTT over T={self.T}, "
                f"{_mb(self.sltt_step_saved_bytes)} for one online SLTT step ({self.memory_ratio:.3f}x)"
            )
        if self.poor:
            lines.append(f"POOR: cosine below {self.threshold} in {', '.join(self.poor_layers)}; SLTT trains "
                         "these layers in another direction than BPTT")
        elif self.cosine < self.threshold:  # each layer points the right way, their sizes do not
            lines.append(f"MIXED: cosine >= {self.threshold} in every layer but {self.cosine:.3f} over the whole "
                         f"model: SLTT shrinks some layers' gradients much more than others' ({self.ratio_range()}), "
                         "so those layers learn at another pace than under BPTT")
        else:
            lines.append(f"ok: cosine >= {self.threshold} in every layer and over the whole model")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table("plain") + "\n" + self.summary()

    def plot(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Save a figure of the per-layer cosine (with the threshold) and norm ratio to ``path`` (any
        format matplotlib writes, from the suffix). Needs matplotlib (``pip install matplotlib``)."""
        try:
            from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
        except ImportError as error:
            raise ImportError(
                "Diagnosis.plot() needs matplotlib, an optional dependency: pip install matplotlib "
                "(the figures are also in diagnosis.table())."
            ) from error
        names = [r.name for r in self.layers]
        positions = list(range(len(names)))
        figure = Figure(figsize=(max(6.0, 0.8 * len(names) + 2.0), 5.5))
        top, bottom = figure.subplots(2, 1, sharex=True)
        colours = ["tab:red" if n in self.poor_layers else "tab:blue" for n in names]
        top.bar(positions, [r.cosine for r in self.layers], color=colours)
        top.axhline(self.threshold, color="gray", linestyle="--", linewidth=1, label=f"threshold {self.threshold}")
        top.set_ylabel("cosine(g_sltt, g_bptt)")
        top.set_ylim(min([0.0] + [r.cosine for r in self.layers if math.isfinite(r.cosine)]), 1.05)
        top.legend(loc="lower left")
        bottom.bar(positions, [r.norm_ratio for r in self.layers], color="tab:gray")
        bottom.axhline(1.0, color="black", linewidth=0.5)
        bottom.set_ylabel("|g_sltt| / |g_bptt|")
        bottom.set_xticks(positions)
        bottom.set_xticklabels([f"{r.name} {r.kind}" for r in self.layers], rotation=30, ha="right")
        figure.suptitle(f"SLTT vs BPTT gradients, T={self.T} (whole model: cosine {self.cosine:.3f})", fontsize=10)
        figure.tight_layout()
        figure.savefig(os.fspath(path))


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _reset(model: nn.Module, neurons: Sequence[NeuronAdapter]) -> None:
    for neuron in neurons:
        neuron.reset_state()
    plugin_manager().hook.slr_reset_model(model=model, neurons=neurons)


def _batch_loss(
    model: nn.Module, x_seq: torch.Tensor, y: torch.Tensor, step_loss: StepLoss, sequence_model: bool,
    choice: OutputChoice, per_step: bool = False, first: bool = False,
) -> torch.Tensor:
    """``(1/T) sum_t L_t(o[t], y)`` over one forward of the whole sequence, as a user's loop computes it
    (``per_step``: one call per step, for a model whose forward returns a rate over time)."""
    outputs = run_in_time(model, x_seq, sequence_model, choice, one_call_per_step=per_step)
    return sum(evaluate_step_loss(step_loss, out, y, t, first=first and t == 0) for t, out in enumerate(outputs)) / len(outputs)


def _gradients(loss: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """d loss / d params without touching ``.grad`` (zeros for parameters the loss does not reach)."""
    if not loss.requires_grad:
        raise LossError(
            "the loss does not require grad: no trainable parameter reaches it (all frozen, the output "
            "detached, or the model run under torch.no_grad())."
        )
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _compare(bptt: List[torch.Tensor], sltt: List[torch.Tensor]) -> Tuple[float, float, float, float]:
    """(cosine, norm ratio, |g_bptt|, |g_sltt|) of the concatenated gradients, in float64."""
    a = torch.cat([g.reshape(-1).double().cpu() for g in bptt])
    b = torch.cat([g.reshape(-1).double().cpu() for g in sltt])
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return math.nan, math.nan, na, nb
    if na == 0.0 or nb == 0.0:
        return 0.0, (math.inf if na == 0.0 else 0.0), na, nb
    return float(a @ b) / (na * nb), nb / na, na, nb


def diagnose(
    model: nn.Module,
    x_seq: torch.Tensor,
    y: torch.Tensor,
    loss: Union[str, Callable, StepLoss] = "ce",
    plot: Union[None, str, "os.PathLike[str]"] = None,
    *,
    output: OutputChoice = None,
    multi_step: Optional[bool] = None,
    threshold: float = POOR_COSINE,
    warn: bool = True,
) -> Diagnosis:
    """Compare SLTT's gradient with BPTT's on one batch, per layer, and what each makes autograd keep.

    :param model: an unwrapped SpikingJelly (single- or multi-step) or snnTorch model (``init_hidden=True``,
        or ``init_hidden=False`` with a forward that takes the whole sequence); run in the train/eval mode
        it is in.
    :param x_seq: input ``[T, B, ...]`` (time first).
    :param y: class indices ``[B]`` (int64).
    :param loss: the per-step loss, as for ``slr.wrap(..., rule="sltt", loss=...)``: ``"ce"``, ``"mse"``,
        ``"ce+mse"``, snnTorch's ``SF.ce_rate_loss()`` / ``SF.mse_membrane_loss()`` or a callable
        ``(o_t [B, C], y [B]) -> scalar``. The batch loss is ``(1/T) sum_t L_t``.
    :param plot: if given, a path to save :meth:`Diagnosis.plot`'s figure to (needs matplotlib).
    :param output: which element of a tuple output the loss uses (index or callable), as for ``wrap``.
    :param multi_step: feed the whole ``[T, B, ...]`` sequence in one call (default: when the neurons are
        in multi-step mode, or the model's forward owns the time loop) or one ``[B, ...]`` step per call.
    :param threshold: a layer whose cosine is below this is reported as poorly approximated.
    :param warn: warn with :class:`SLTTApproximationWarning` when a layer is below the threshold.
    :return: a :class:`Diagnosis`.

    **Gradients.** Both passes run the same forward on the same batch from reset neurons, with the same
    random state (dropout draws), and differentiate the same loss with ``torch.autograd.grad``, so the
    parameters' ``.grad`` are never written. The BPTT pass is the model as it is; the SLTT pass wraps it in
    zero-change SLTT mode (``slr.wrap(model, rule="sltt")``) and unwraps it afterwards. Their difference is
    the temporal routes SLTT cuts, nothing else (on a multi-step model BN normalises over T*B in both).

    **Memory.** What is measured is the bytes of the distinct tensor storages autograd saves for backward
    (``torch.autograd.graph.saved_tensors_hooks``), leaving out parameters, buffers and ``x_seq`` itself,
    which exist whatever the rule: for BPTT over the full forward of the batch, for SLTT over one step of
    online training (the largest over the T steps; each step's graph is freed before the next, as
    ``learner.step`` does). It is the activation memory the rule needs, not the process's peak memory
    (allocator caches and temporaries of backward are not counted).

    :raises WrapError: the model is wrapped (diagnose compares both rules on the plain model: unwrap it),
        or a neuron passes no gradient as it is set now (SpikingJelly 0.0.0.0.14's LIF in eval mode).
    :raises LayoutError: ``x_seq``/``y`` have the wrong layout, dtype or device.
    :raises LossError: the loss is not a scalar or reaches no trainable parameter.
    """
    if isinstance(model, nn.Module) and learner_of(model) is not None:
        raise WrapError(
            f"this {type(model).__name__} is wrapped by rule {learner_of(model).name!r}, so its plain gradient "
            "would not be BPTT's; call slr.unwrap(model) before diagnose(), and wrap it again afterwards."
        )
    T = check_sequence_batch(x_seq, y)
    neurons = find_neurons(model)
    check_devices(model, x_seq, y)
    check_neurons_pass_gradients(model, neurons)
    if not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold!r}.")
    check_output_choice(output)
    step_loss = resolve_step_loss(loss, plugin_answer=lambda obj: plugin_manager().hook.slr_step_loss(loss=obj))
    choice = output if output is not None else step_loss.output_index
    owns_loop = any(n.explicit_state for n in neurons)
    sequence_model = multi_step if multi_step is not None else owns_loop or any(n.multi_step for n in neurons) \
        or bool(plugin_manager().hook.slr_takes_sequences(model=model, neurons=neurons))
    # a multi-step model whose forward returns a rate is compared on per-step calls, as online mode trains it
    per_step = sequence_model and not owns_loop and probe_reduces_time(model, x_seq, choice,
                                                                      lambda: _reset(model, neurons))

    # each trainable parameter belongs to the first module (in model order) that holds it
    groups: List[Tuple[str, nn.Module, List[torch.Tensor]]] = []
    seen: set = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            groups.append((name or "<model>", module, own))
    params = [p for _, _, own in groups for p in own]
    if not params:
        raise WrapError(
            "the model has no trainable parameter (all requires_grad=False): there is no gradient to compare."
        )

    buffers = buffer_copies(model)
    exclude = storage_keys([x_seq, *model.parameters(), *(b for _, _, b, _ in buffers)])
    rng = rng_states(x_seq.device)

    def fresh_start() -> None:
        restore_buffers(buffers)  # BN running statistics as before the call, so both passes start alike
        _reset(model, neurons)
        set_rng_states(rng, x_seq.device)

    step_bytes: Optional[int] = None
    try:
        fresh_start()
        with torch.enable_grad(), SavedBytes(exclude) as bptt_saved:
            bptt_loss = _batch_loss(model, x_seq, y, step_loss, sequence_model, choice, per_step, first=True)
        g_bptt = _gradients(bptt_loss, params)
        loss_value = float(bptt_loss.detach())
        del bptt_loss

        learner = wrap(model, rule="sltt", output=output, multi_step=multi_step)
        try:
            fresh_start()
            with torch.enable_grad():
                sltt_loss = _batch_loss(model, x_seq, y, step_loss, sequence_model, choice, per_step)
            g_sltt = _gradients(sltt_loss, params)
            del sltt_loss
            if not owns_loop:
                step_bytes = _online_step_bytes(model, x_seq, y, step_loss, sequence_model, choice, exclude,
                                                learner.packer)
                fresh_start()
        finally:
            learner.unwrap()
    finally:
        fresh_start()  # the model, its buffers and torch's random state as the caller left them

    layers = []
    for (name, module, own) in groups:
        index = [i for i, p in enumerate(params) if any(p is q for q in own)]
        cosine, ratio, nb, ns = _compare([g_bptt[i] for i in index], [g_sltt[i] for i in index])
        layers.append(LayerGradient(name, type(module).__name__, sum(p.numel() for p in own), cosine, ratio, nb, ns))
    cosine, ratio, _, _ = _compare(g_bptt, g_sltt)
    poor = [r.name for r in layers if r.cosine < threshold]  # NaN (no gradient in either) is not poor
    result = Diagnosis(layers, cosine, ratio, loss_value, T, x_seq.shape[1], bptt_saved.total, step_bytes,
                       float(threshold), poor)
    if poor and warn:
        listed = ", ".join(f"{r.name} ({r.cosine:.3f})" for r in layers if r.name in poor)
        warnings.warn(
            SLTTApproximationWarning(
                f"SLTT is a poor approximation of BPTT for this model: gradient cosine below {threshold} in "
                f"{listed}. SLTT drops the gradient through the neurons' memory, which matters for slow-decaying "
                "(large tau, beta near 1) and two-state (synaptic current) neurons. Train with BPTT (or a "
                "memory-saving exact method), or use faster-decaying neurons, if accuracy suffers."
            ),
            stacklevel=2,
        )
    elif warn and cosine < threshold:
        warnings.warn(
            SLTTApproximationWarning(
                f"SLTT's gradient points as BPTT's in every layer (cosine >= {threshold}) but not over the whole "
                f"model (cosine {cosine:.3f}): it scales the layers unevenly ({result.ratio_range()}), so they "
                "learn at other relative paces than under BPTT. Typical of slow-decaying or two-state neurons; "
                "watch the accuracy, or train with BPTT."
            ),
            stacklevel=2,
        )
    if plot is not None:
        result.plot(plot)
    return result


def _online_step_bytes(
    model: nn.Module, x_seq: torch.Tensor, y: torch.Tensor, step_loss: StepLoss, sequence_model: bool,
    choice: OutputChoice, exclude: set, packer: Any = None,
) -> int:
    """The most bytes autograd saves for one step of online SLTT (the model is wrapped): the steps run
    one per forward, as ``learner.step`` runs them, and each step's graph is dropped before the next;
    spikes count as the wrapper's ``packer`` keeps them."""
    T = x_seq.shape[0]
    most = 0
    with torch.enable_grad():
        for t in range(T):
            with SavedBytes(exclude, packer=packer) as saved:
                (out,) = run_in_time(model, x_seq[t : t + 1], sequence_model, choice)
                step = evaluate_step_loss(step_loss, out, y, t) / T
            most = max(most, saved.total)
            del out, step
    return most
