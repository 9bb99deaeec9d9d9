"""SLTT: Spatial Learning Through Time (Meng et al., ICCV 2023), and SLTT-K.

SLTT is backpropagation with the temporal routes cut: at every time step each neuron's carried state
(membrane, synaptic current, last spike of a recurrent neuron) enters the step as a constant. The gradient
of step t then depends on step t's graph alone, so it can be computed online and memory stops growing
with T. SLTT-K backpropagates only K randomly drawn steps of each batch.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import graphs
from ..adapter import NeuronAdapter
from ..errors import LayoutError, LossError, NonFiniteLossError, UnsupportedModelError, WrapError
from ..functional.losses import StepLoss, evaluate_step_loss, resolve_step_loss
from ..functional.norm_recompute import NormSources, channel_dim, rebuild_input_from
from ..functional.spike_pack import SpikePacker, others_on_top, pooled_window
from ..memory import SavedBytes, memory_budget, storage_keys
from ..plugins import plugin_manager
from ..wrap import ModuleHooks, check_carried_holder
from .base import (
    DrivesOptimizer,
    NeuronCalls,
    OutputChoice,
    Rule,
    autocast_context,
    backward,
    buffer_copies,
    check_optimizer,
    check_chunk,
    check_clip_grad_norm,
    check_common_options,
    check_output_choice,
    check_finite_gradients,
    check_precision,
    check_sequence_batch,
    contiguous_runs,
    guarded_step,
    optimizer_step,
    probe_reduces_time,
    restore_buffers,
    rng_states,
    run_in_time,
    set_rng_states,
    whole_sequence_error,
    whole_sequence_modules,
)


@dataclass
class StepStats:
    """What :meth:`SLTT.step` reports for one batch.

    :ivar loss: the batch loss ``(1/T) sum_t L_t`` over the backpropagated steps (a float).
    :ivar steps: the time steps whose loss was backpropagated (all of them unless SLTT-K).
    :ivar output_counts: the model outputs summed over all T steps, ``[B, C]`` (spike counts for a
        spiking output layer), detached; ``output_counts.argmax(-1)`` is the prediction.
    :ivar T: number of time steps in the batch.
    :ivar skipped: with a ``scaler`` (mixed precision), True when the scaled gradients overflowed and the
        optimizer step of this batch was skipped (the scaler lowered its scale); always False without one.
    """

    loss: float
    steps: List[int]
    output_counts: torch.Tensor
    T: int
    skipped: bool = False

    def correct(self, y: torch.Tensor) -> int:
        """How many samples of the batch the summed outputs classify correctly."""
        return int((self.output_counts.argmax(-1) == y.to(self.output_counts.device)).sum())


def _accumulate(counts: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Running sum of the outputs over time, in at least float32 (under autocast the outputs may be
    bfloat16, whose 8-bit mantissa cannot count past 256)."""
    out = out.detach()
    dtype = torch.promote_types(out.dtype, torch.float32)
    # a copy: a replayed CUDA graph writes its next outputs into the same tensor
    return out.to(dtype, copy=True) if counts is None else counts + out.to(dtype)


def _normalises_over_batch(norm: nn.Module) -> bool:
    """Whether a batch norm uses the statistics of its input batch now (as ``_BatchNorm.forward`` decides)."""
    return norm.training or getattr(norm, "running_mean", None) is None


def _cut_state_pre_hook(neuron: NeuronAdapter) -> Callable:
    """A forward pre-hook: the neuron's carried state enters this call as a constant."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        adapter = neuron.for_module(module)  # a deep copy of the model carries this hook along
        adapter.detach_state()
        if adapter.explicit_state:
            return adapter.detach_call_state(args, kwargs)
        return None

    return hook


def _per_step_forward(neuron: NeuronAdapter, fused: bool = False, packer: Optional[SpikePacker] = None,
                      norms: Optional[NormSources] = None, recharge: bool = True) -> Callable:
    """A per-instance forward for multi-step-capable neurons: with autograd on and the module in
    multi-step mode, run the sequence with the state cut before each step: in one fused call with SLTT's
    elementwise backward when ``fused`` and the adapter has that form for the neuron as configured
    (``NeuronAdapter.fused_sltt_multi_step``), else one step at a time. Otherwise (single-step, or
    no_grad) call the neuron's own forward unchanged, so inference keeps its fast path. With ``norms``, a
    fused call whose input is a batch norm's output keeps that norm's input instead of its membrane;
    ``recharge=False``: every fused call keeps its membrane (``recompute_membrane=False``)."""
    base = neuron

    def forward(module: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        neuron = base.for_module(module)  # a deep copy of the model gets this forward bound to its neuron
        if neuron.multi_step and torch.is_grad_enabled():
            if args or kwargs:
                raise UnsupportedModelError(
                    f"{neuron.describe()} was called in multi-step mode with extra arguments; snn-localrules "
                    "can only step a neuron whose forward takes the input sequence alone. Run the model in "
                    "single-step mode (functional.set_step_mode(model, 's')) and loop over time instead."
                )
            if fused:
                source = norms.source_of(x) if norms is not None else None
                if source is not None and others_on_top(packer):
                    # a checkpoint inside the model recomputes this call outside the learner's forward,
                    # where no norm is recorded: keep what that recomputation keeps, the membrane
                    source = None
                with rebuild_input_from(x, source, packer, recharge=recharge):
                    out = neuron.fused_sltt_multi_step(x)
                if out is not None:
                    if packer is not None and neuron.fused_outputs_binary:
                        packer.register(out)  # a Heaviside's output: exactly 0/1, stored in one byte when saved
                    return out
            return neuron.run_steps(x, neuron.detach_state)
        return neuron.own_forward(x, *args, **kwargs)

    return forward


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _own_seed(seed: int) -> int:
    """A seed for the learner's generator derived from torch's, so that its draws are not the first numbers
    of the user's own stream."""
    return (seed ^ 0x736C74746B) % (2 ** 63)


def install_temporal_cut(hooks: ModuleHooks, neurons: Sequence[NeuronAdapter], fused: bool = False,
                         packer: Optional[SpikePacker] = None, norms: Optional[NormSources] = None,
                         recharge: bool = True) -> None:
    """Cut every neuron's carried state from the graph at every step (both step modes). ``fused``: run
    multi-step calls of neurons that have a fused SLTT form in one call (same gradients, less time), and
    register their spikes with ``packer``; with ``norms``, a fused call fed by a batch norm keeps no
    membrane (both activated by the caller around the model's forward)."""
    for neuron in neurons:
        hooks.pre_hook(neuron.module, _cut_state_pre_hook(neuron), with_kwargs=True)
        if neuron.supports_multi_step:
            hooks.replace_forward(neuron.module, _per_step_forward(neuron, fused, packer, norms, recharge))


def _check_labels(out: torch.Tensor, y: torch.Tensor, error: Exception) -> None:
    """After a loss failed on a per-step output ``[B, C]``: labels outside ``[0, C)`` are the cause to name.
    (The class range is only known from the output: checked on failure, no host sync otherwise; of another
    shape the loss's own error says more.)"""
    classes = out.shape[-1] if out.dim() in (1, 2) else None
    if isinstance(error, (IndexError, RuntimeError)) and classes is not None and y.numel() \
            and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise LossError(
            f"labels must be class indices in [0, {classes}) (the model outputs {classes} values per "
            f"sample); y holds [{int(y.min())}, {int(y.max())}]. Check the labels or the output layer."
        ) from error


WHOLE_SEQUENCE_FIX = ("Train it in zero-change mode (slr.wrap(model, rule='sltt') and your own loop over whole "
                      "sequences), or online with chunk at least T and no K.")


def install_carried_cut(hooks: ModuleHooks, model: nn.Module, neurons: Sequence[NeuronAdapter]) -> List[Any]:
    """Online rules: the state that layers other than neurons carry from one call of the model to the next
    (SpikingJelly's ``SynapseFilter``, ``NeuNorm``, ...: the plugins' ``slr_carried_state``) enters each
    call as a constant, as a neuron's does. The learner backpropagates every call (step or chunk) on its
    own, so a graph carried into the next one would be backpropagated twice. Within a multi-step call of
    several steps such a layer keeps its own route (it is not stepped, as neurons are). Returns the
    plugins' holders of that state (``get_state``/``set_state``)."""
    found = plugin_manager().hook.slr_carried_state(model=model, neurons=neurons)
    holders = [h for answer in found for h in (answer or ())]
    for holder in holders:
        check_carried_holder(holder)
        hooks.pre_hook(holder.module, _cut_carried_pre_hook(holder))
    return holders


def adopt_carried(hooks: ModuleHooks, carried: List[Any], holders: Sequence[Any]) -> None:
    """Cut the state of ``holders`` (stateful layers put into the model after it was wrapped) before each
    call, as :func:`install_carried_cut` does for those found at wrap time, and count them in ``carried``."""
    for holder in holders:
        hooks.pre_hook(holder.module, _cut_carried_pre_hook(holder))
        carried.append(holder)


def _cut_carried_pre_hook(holder: Any) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        own = holder.for_module(module) if hasattr(holder, "for_module") else holder  # a deep copy's own
        if isinstance(own, NeuronAdapter):
            own.detach_state()
        else:  # the same cut for any holder: it needs only get_state/set_state
            NeuronAdapter.detach_state(own)

    return hook


def install_forward_scope(hooks: ModuleHooks, model: nn.Module, scopes: Sequence[Any]) -> bool:
    """Activate ``scopes`` (objects with ``enter``/``exit``: the spike packer, the batch-norm sources) while
    ``model``'s forward runs: a per-instance ``forward`` around the class's own, whose ``finally`` exits
    them whatever ends the call (an exception, a KeyboardInterrupt), which forward hooks cannot promise.
    Returns False (nothing installed) when the model already has a per-instance forward (e.g. the model is a
    single multi-step neuron: nothing downstream saves its spikes, nothing upstream normalises)."""
    if "forward" in vars(model):
        return False

    def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        entered = []
        try:
            for scope in scopes:
                scope.enter()
                entered.append(scope)
            return type(module).forward(module, *args, **kwargs)
        finally:
            for scope in reversed(entered):
                scope.exit()

    hooks.replace_forward(model, forward)
    return True


class SLTT(DrivesOptimizer, Rule):
    """Spatial Learning Through Time.

    Built by ``slr.wrap(model, rule="sltt", ...)``. Two modes:

    * **zero-change** (no ``optimizer``): the user's own loop runs as before — forward over T steps, a loss,
      ``loss.backward()`` — and gets SLTT gradients: each neuron's carried state is cut at every step.
    * **online** (``optimizer`` given): :meth:`step` runs the time loop itself, backpropagates each step's
      loss at once and frees its graph, and takes one optimizer step per batch. Peak memory is that of one
      time step, whatever T. With ``K`` it is SLTT-K.

    :param optimizer: the optimizer over the model's parameters; its presence selects online mode.
    :param loss: per-step loss for online mode: ``"ce"`` (default), ``"mse"``, ``"ce+mse"`` (the authors'
        default mix, alpha=0.05, MSE target all ones), ``"ce+mse_onehot"`` (one-hot MSE target, their
        DVS-CIFAR10 setting), snnTorch's ``SF.ce_rate_loss()`` / ``SF.mse_membrane_loss()``, or a
        callable ``(o_t, y) -> scalar``; the batch loss is ``(1/T) sum_t L_t``.
    :param K: SLTT-K: backpropagate only K distinct steps per batch (the others run forward under
        ``no_grad``; the loss is still divided by T). ``None``: all steps.
    :param sample: how SLTT-K picks its steps: ``"random"`` (as the authors' code) or ``"last"``.
    :param seed: seed of the learner's own generator for SLTT-K's draws; ``None``: derived from torch's
        seed (``torch.manual_seed``) when the learner is built, so runs of different seeds draw different
        steps.
    :param output: which element of a tuple model output the loss uses (index, or callable). Default 0
        (snnTorch's spikes), or -1 (the membrane, last in every snnTorch neuron's output) for snnTorch's
        membrane losses.
    :param multi_step: feed the model whole ``[c, B, ...]`` chunks (``True``) or one ``[B, ...]`` step per
        call (``False``). Default: chunks when the model's neurons are in multi-step mode.
    :param T: if given, every batch must have exactly T steps.
    :param nograd_chunk: SLTT-K runs the steps it does not backpropagate forward only, as multi-step
        calls of at most this many steps (multi-step models): longer is faster, shorter holds less. A batch
        norm that normalises with batch statistics (training mode) then normalises over the call's
        ``steps · B`` samples and updates its running statistics once per call. ``None`` (default): with
        such a batch norm in the model, as many steps per call as ``chunk`` (1 unless set; the chunk size
        found by ``"auto"``), so that every step, backpropagated or not, sees the same normalisation, on
        any device; without one, on CUDA one call per run of unselected steps (launches are what cost
        there, and a no-grad call frees each layer's activations as it goes), on CPU at most 4 steps per
        call (measured on the project's CPU machine: 8 held about 30 MB more at T=16 for little gain).
    :param fused: run a multi-step call of a neuron that has a fused SLTT form (SpikingJelly ``IFNode``,
        ``LIFNode``, ``ParametricLIFNode``) as one call with an elementwise backward over all its steps
        (:mod:`snn_localrules.functional.sltt_multistep`) instead of step by step: the same gradients,
        fewer autograd nodes. Neurons without a proven-equal fused form are always stepped.
    :param pack_spikes: with ``fused``, the spikes of fused neurons are kept for backward as 1-byte values
        (instead of 4 in fp32) by the layers that save them (the conv, linear or pool after a neuron; also
        max-pooled and power-of-two average-pooled spikes, as exact counts): exactly the same values, so
        the same gradients, and less memory
        (:mod:`snn_localrules.functional.spike_pack`). It stands aside while other saved-tensor hooks are
        active (``torch.utils.checkpoint``, ``save_on_cpu``) and under ``torch.compile``.
    :param recompute_membrane: with ``fused``, a fused neuron whose input comes straight from a batch norm
        (``BatchNorm1d/2d/3d``, torch's or SpikingJelly's; float32/float64) keeps no membrane for backward: it
        charges again from the batch norm's input, which the batch norm keeps anyway, and its own spikes
        (:mod:`snn_localrules.functional.norm_recompute`). The same gradients to rounding, one ``[T, N]``
        fp32 tensor less per such neuron, an elementwise pass more in backward. A PLIF neuron with
        ``decay_input`` whose ``w`` learns keeps its input for that gradient and, likewise, no membrane
        beside it. ``False``: every fused neuron keeps its membrane, and its backward has no time loop.
    :param autocast: mixed precision for online mode: ``None``/``False`` (off), ``True`` (the device's
        default autocast dtype: bfloat16 on CPU, float16 on CUDA) or a dtype. Each step's forward and loss
        run under ``torch.autocast``; backward runs outside it. Running :meth:`step` inside your own
        ``torch.autocast`` block works too.
    :param chunk: online mode: how many consecutive backpropagated steps share one forward call (a
        multi-step model gets ``[c, B, ...]`` in one call, its neurons fused where they can be) and one
        backward, of the sum of their per-step losses. The neurons' state is cut at every step as always,
        so the gradients are SLTT's for any ``c`` (with batch norm in a multi-step model, its statistics
        are over ``c*B`` samples, as in any multi-step call). ``1`` (default): one step per backward, the
        least memory. Larger ``c``: fewer, larger calls (faster on a GPU), ``c`` steps' activations held.
        ``"auto"``: the largest ``c`` whose saved activations fit ``max_memory`` (``learner.chunk_size``;
        a batch of T steps runs ``min(T, c)`` per backward), from the bytes autograd keeps for one step,
        with spikes as ``pack_spikes`` keeps them (``learner.step_bytes``), measured once, before the first
        batch, by a forward and backward of its first step that is then undone, so every batch, the first
        too, trains as with ``chunk=c``. Measured at the first batch's size: a later, larger batch
        holds proportionally more.
    :param max_memory: the budget of ``chunk="auto"``: bytes, or a fraction (0, 1] of the device's memory
        (the GPU's total memory on CUDA, the machine's physical memory on CPU) for the activations
        autograd saves for one chunk.
    :param cuda_graphs: online mode on CUDA: capture each backpropagated step (or chunk) -- forward, loss,
        backward into ``.grad`` -- as a CUDA graph and replay it, one launch instead of hundreds (where
        small batches spend their time). The same gradients; the first steps run eagerly (warm-up), the
        capture happens once per input shape, and ``.grad`` tensors are zeroed in place between batches,
        never set to ``None``. Replays run no Python: hooks or prints in the model's forward see only the
        eager steps. A model that cannot be captured (``.item()`` or a Python ``if`` on a tensor in its
        forward or loss, distributed wrappers, CPU tensors) trains eagerly, with one warning saying why
        (:mod:`snn_localrules.graphs`).
    :param scaler: a ``torch.amp.GradScaler`` for float16: each step's loss is scaled before its backward,
        and once per batch the scaler unscales, checks for inf/NaN, steps the optimizer (or skips the whole
        batch, ``stats.skipped``) and updates its scale.
    :param clip_grad_norm: online mode: before each optimizer step, scale the batch's gradients (of the
        optimizer's parameters, unscaled first with a ``scaler``) down to a total 2-norm of at most this, as
        ``torch.nn.utils.clip_grad_norm_`` between ``backward()`` and ``step()`` of a plain loop. ``None``:
        no clipping.

    Distributed training: wrap the ``DistributedDataParallel`` model (``slr.wrap(ddp_model, ...)``). A model
    with ``no_sync()`` (DDP, FSDP) runs every backpropagated step but the batch's last one under it, so the
    gradients are all-reduced once per batch instead of once per step.
    """

    name = "sltt"

    def __init__(
        self,
        model: nn.Module,
        neurons: Sequence[NeuronAdapter],
        optimizer: Optional[torch.optim.Optimizer] = None,
        loss: Union[str, Callable, StepLoss] = "ce",
        K: Optional[int] = None,
        sample: str = "random",
        seed: Optional[int] = None,
        output: OutputChoice = None,
        multi_step: Optional[bool] = None,
        T: Optional[int] = None,
        nograd_chunk: Optional[int] = None,
        fused: bool = True,
        autocast: Union[None, bool, torch.dtype] = None,
        scaler: Optional[Any] = None,
        chunk: Union[int, str] = 1,
        max_memory: Union[None, int, float] = None,
        pack_spikes: bool = True,
        recompute_membrane: bool = True,
        cuda_graphs: bool = False,
        clip_grad_norm: Optional[float] = None,
    ):
        super().__init__(model, neurons)
        self.optimizer = optimizer
        self.online = optimizer is not None
        if self.online:
            check_optimizer(optimizer, model)
            explicit = [n.describe() for n in self.neurons if n.explicit_state]
            if explicit:
                raise WrapError(
                    "online mode runs the time loop itself, but this model's forward owns the time loop: "
                    f"its neurons ({', '.join(explicit)}) get their state passed in by the user's code "
                    "(as snnTorch's with init_hidden=False). Use zero-change mode, slr.wrap(model, rule='sltt') "
                    "without an optimizer, and keep your own loop; or let the neurons keep their state "
                    "(snnTorch: init_hidden=True)."
                )
        elif K is not None:
            raise WrapError(
                "K (SLTT-K) needs online mode, where the learner drives the time loop: pass optimizer=..."
            )
        else:
            # what only the learner's own steps use: in zero-change mode the user's loop computes the loss
            # and runs the steps (T, output and multi_step serve predict() in both modes)
            unused = [name for name, value, default in (
                ("loss", loss, "ce"), ("sample", sample, "random"), ("seed", seed, None),
                ("nograd_chunk", nograd_chunk, None), ("autocast", autocast, None),
            ) if not (value is default or (isinstance(value, str) and value == default) or
                      (name == "autocast" and value is False))]
            if unused:
                raise WrapError(
                    f"{', '.join(unused)} {'sets' if len(unused) == 1 else 'set'} how online mode's steps run, "
                    "but without an optimizer this is zero-change mode, where your own loop computes the loss "
                    "and runs the steps, so it would change nothing. Pass optimizer=... for online mode, or "
                    "drop it (in your loop: your loss, torch.autocast for mixed precision)."
                )
        check_common_options(seed, T, multi_step, seed_may_be_none=True)
        check_output_choice(output)
        if K is not None and (not isinstance(K, int) or isinstance(K, bool) or K < 1):
            raise WrapError(f"K must be a positive int (steps backpropagated per batch) or None, got {K!r}.")
        if sample not in ("random", "last"):
            raise WrapError(f"sample must be 'random' or 'last', got {sample!r}.")
        if nograd_chunk is not None and (not isinstance(nograd_chunk, int) or isinstance(nograd_chunk, bool)
                                         or nograd_chunk < 1):
            raise WrapError(f"nograd_chunk must be a positive int or None, got {nograd_chunk!r}.")
        if not isinstance(fused, bool):
            raise WrapError(f"fused must be True or False, got {fused!r}.")
        if not isinstance(pack_spikes, bool):
            raise WrapError(f"pack_spikes must be True or False, got {pack_spikes!r}.")
        if not isinstance(recompute_membrane, bool):
            raise WrapError(f"recompute_membrane must be True or False, got {recompute_membrane!r}.")
        if not isinstance(cuda_graphs, bool):
            raise WrapError(f"cuda_graphs must be True or False, got {cuda_graphs!r}.")
        if cuda_graphs and not self.online:
            raise WrapError(
                "cuda_graphs captures the steps of online training, which needs an optimizer: "
                "slr.wrap(model, rule='sltt', optimizer=opt, cuda_graphs=True). In zero-change mode your own "
                "loop runs the steps; capture it with torch.cuda.graphs yourself."
            )
        self.graphs: Optional[graphs.StepGraphs] = None
        if cuda_graphs:
            carried = [h for found in plugin_manager().hook.slr_carried_state(model=model, neurons=self.neurons)
                       for h in (found or ())]
            self.graphs = graphs.StepGraphs([*self.neurons, *carried])
        self.fused = fused
        self.pack_spikes = pack_spikes
        self.recompute_membrane = recompute_membrane
        self.packer: Optional[SpikePacker] = None
        check_precision(autocast, scaler, self.online)
        check_chunk(chunk, max_memory, self.online)
        check_clip_grad_norm(clip_grad_norm, self.online)
        self.clip_grad_norm = clip_grad_norm
        self.chunk = chunk
        self.max_memory = max_memory
        self.chunk_size: Optional[int] = None if chunk == "auto" else chunk  # "auto": set by the first batch
        #: chunk="auto": the bytes autograd kept for the measured first step (spikes packed where they are)
        self.step_bytes: Optional[int] = None
        self.autocast = autocast
        self.scaler = scaler
        self.step_loss = resolve_step_loss(loss, plugin_answer=lambda obj: plugin_manager().hook.slr_step_loss(loss=obj))
        self.K = K
        self.sample = sample
        self.seed = None if seed is None else int(seed)
        self.T = T
        self.output = output if output is not None else self.step_loss.output_index
        # a loss that reads an element of a tuple output (snnTorch's membrane losses) on a model that returns
        # one tensor would read that tensor whatever it is: checked once, at the first step with an output
        self._check_tuple_output = output is None and self.step_loss.output_index not in (None, 0)
        self.multi_step = multi_step
        self.nograd_chunk = nograd_chunk
        # seed=None follows the run's torch.manual_seed (without drawing from torch's generator, so the
        # user's data order stays as it is): runs of different seeds draw different steps
        self.generator = torch.Generator().manual_seed(
            self.seed if self.seed is not None else _own_seed(torch.initial_seed()))
        self._batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # the first batch fed one step per call counts neuron calls (a forward that loops over time itself)
        self._calls: Optional[NeuronCalls] = None
        self._calls_checked = False
        #: a multi-step model whose forward reduces its output over time: None until the first batch
        self._reduces_time: Optional[bool] = None
        self._loss_worked = False  # the loss has returned once: a later failure is not about its shapes
        # modules that must get whole sequences (per-step scales, attention over T): online mode needs
        # chunk >= T and no K
        self._whole_sequence = whole_sequence_modules(model, self.neurons) if self.online else []
        if self._whole_sequence and (K is not None or chunk == "auto" or (T is not None and chunk < T)):
            how = (f"SLTT-K (K={K}) runs the steps it backpropagates and those it does not in calls of their own"
                   if K is not None else
                   "chunk='auto' picks a chunk shorter than T where memory is short" if chunk == "auto" else
                   f"online SLTT at chunk={chunk} feeds it {chunk} of the T={T} steps per call")
            raise whole_sequence_error(self._whole_sequence, how, WHOLE_SEQUENCE_FIX)

    def install(self, hooks: ModuleHooks) -> None:
        # a model that is itself one neuron has nothing downstream that saves its spikes
        alone = any(n.module is self.model for n in self.neurons)
        packer = SpikePacker() if self.pack_spikes and self.fused and not alone else None
        norms = NormSources() if self.recompute_membrane and self.fused and not alone else None
        scopes = [scope for scope in (packer, norms) if scope is not None]
        if scopes and not install_forward_scope(hooks, self.model, scopes):
            packer = norms = None
        for module in self.model.modules():
            if packer is not None and pooled_window(module) is not None:
                hooks.forward_hook(module, packer.derive)  # pooled spikes are countable too
            if norms is not None and channel_dim(module) is not None:
                hooks.forward_hook(module, norms.record)
        install_temporal_cut(hooks, self.neurons, fused=self.fused, packer=packer, norms=norms,
                             recharge=self.recompute_membrane)
        if self.online:
            self._carried = install_carried_cut(hooks, self.model, self.neurons)
        self.packer = packer

    # -- online driver ---------------------------------------------------------------------------
    def select_steps(self, T: int) -> List[int]:
        """The steps backpropagated in a batch of T steps (all, or SLTT-K's K)."""
        if self.K is None:
            return list(range(T))
        if self.K > T:
            raise WrapError(f"K={self.K} but the batch has only T={T} time steps; use K <= T.")
        if self.sample == "last":
            return list(range(T - self.K, T))
        return sorted(torch.randperm(T, generator=self.generator)[: self.K].tolist())

    @guarded_step()
    def step(self, x_seq: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Train on one batch online: per-step forward and backward, one optimizer step.

        :param x_seq: input ``[T, B, ...]`` (time first).
        :param y: class indices ``[B]``.
        :return: :class:`StepStats` (loss, backpropagated steps, output counts).
        :raises NonFiniteLossError: a step's loss (or a gradient) is NaN or infinite; the parameters and
            the optimizer state are unchanged and the parameters' ``.grad`` are cleared (``None``).
        """
        # wrapped, layout, T and devices are checked by @guarded_step before this body runs
        if not self.online:
            raise WrapError(
                "step() drives online training and needs an optimizer: slr.wrap(model, rule='sltt', "
                "optimizer=opt). In zero-change mode keep your own loop and call loss.backward()."
            )
        T = x_seq.shape[0]
        selected = self.select_steps(T)
        sequence_model = self._sequence_model()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        no_sync = getattr(self.model, "no_sync", None)  # DDP/FSDP: all-reduce once per batch, not per step
        last_backprop = selected[-1] if selected else None
        self._graphs_for(x_seq, no_sync)
        if self._whole_sequence and self.chunk_size < T:
            raise whole_sequence_error(
                self._whole_sequence,
                f"online SLTT at chunk={self.chunk_size} feeds it {self.chunk_size} of this batch's T={T} steps per call",
                WHOLE_SEQUENCE_FIX)
        if not self._calls_checked:
            self._calls = NeuronCalls(self.neurons, x_seq.shape[1], self.model if sequence_model else None)
        try:
            self._learn_time_layout(x_seq, sequence_model)
            if self.chunk_size is None:
                self._measure_chunk(x_seq, y, T, sequence_model)
        except BaseException:
            if self._calls is not None:  # the neuron-call counter's hooks go with the failed batch
                self._calls.remove()
                self._calls = None
            raise
        self.reset_state()
        self.optimizer.zero_grad(set_to_none=True)
        model_params = list(self.model.parameters()) if self.graphs is not None else []
        if self.graphs is not None:
            self.graphs.start_batch(model_params)  # captured steps accumulate into fixed .grad tensors
        total: Optional[torch.Tensor] = None  # summed on the loss's device: no host sync per step
        counts: Optional[torch.Tensor] = None
        finite: List[torch.Tensor] = []
        starts: List[int] = []  # the first step of each backward, to name the step whose loss is not finite
        skipped = False
        try:
            for start, stop, backprop in contiguous_runs(selected, T):
                if backprop:
                    a = start
                    while a < stop:
                        b = min(a + self.chunk_size, stop)
                        deferred = callable(no_sync) and b - 1 != last_backprop
                        body = functools.partial(self._backprop, T=T, first=a, sequence_model=sequence_model,
                                                 saved=contextlib.nullcontext())
                        with no_sync() if deferred else contextlib.nullcontext():
                            if self.graphs is not None:
                                key = (T, self.model.training, sequence_model, self.autocast)
                                outs, loss_c = self.graphs.run(body, x_seq[a:b], y, key, model_params)
                            else:
                                outs, loss_c = body(x_seq[a:b], y)
                        finite.append(torch.isfinite(loss_c))  # checked once per batch: no sync per step
                        starts.append(a)
                        total = loss_c.detach().clone() if total is None else total + loss_c.detach()
                        for out in outs:
                            counts = _accumulate(counts, out)
                        del outs, loss_c
                        a = b
                else:
                    # steps that are not backpropagated: forward only, in multi-step calls of at most
                    # nograd_chunk steps (fast, and memory stays bounded whatever T is)
                    with torch.no_grad(), autocast_context(self.autocast, x_seq.device.type):
                        longest = self._nograd_chunk(x_seq, stop - start)
                        for a in range(start, stop, longest):
                            chunk = x_seq[a : min(a + longest, stop)]
                            for out in self._run(chunk, sequence_model):
                                counts = _accumulate(counts, out)
            self._check_finite(finite, starts, total)
            if self.scaler is None:
                check_finite_gradients(self.model, params)
            # with a scaler: it unscales, skips the step if any gradient overflowed, and adapts its scale,
            # once per batch however many steps were backpropagated
            skipped = optimizer_step(self.optimizer, self.scaler, self.clip_grad_norm)
        except BaseException:
            # Keeping the previous batch's gradients to restore them would hold a second copy of every
            # gradient through the whole batch; a failed batch leaves .grad cleared instead.
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            if self._calls is not None:
                self._calls.remove()
                self._calls = None
            self.reset_state()
        return StepStats(loss=float(total) if total is not None else 0.0, steps=selected, output_counts=counts,
                         T=T, skipped=skipped)

    def _backprop(self, x: torch.Tensor, y: torch.Tensor, T: int, first: int, sequence_model: bool,
                  saved: Any) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Forward, loss and backward of the steps ``first, first + 1, ...`` of ``x`` ``[c, B, ...]``: what
        a CUDA graph captures. Returns the per-step outputs and the chunk's loss (summed, over T)."""
        with autocast_context(self.autocast, x.device.type), saved:
            outs = self._run(x, sequence_model)
            loss = sum(self._step_loss(out, y, t) for t, out in enumerate(outs, first)) / T
        backward(loss, self.scaler)
        return outs, loss

    def _run(self, x: torch.Tensor, sequence_model: bool) -> List[torch.Tensor]:
        """``run_in_time`` of the model over ``x`` ``[c, B, ...]``; on the first batch of a model fed one
        step per call, first check that no neuron ran more often than the model (before any backward)."""
        try:
            outs = run_in_time(self.model, x, sequence_model, self.output, one_call_per_step=bool(self._reduces_time))
        except Exception as error:
            # a forward that loops over time also returns no per-step output, and neurons that took the
            # steps for samples may make a later layer fail (a batch norm sized for B): say that, rather
            # than blame the input's layout or leave torch's shape error
            if self._calls is not None and (isinstance(error, LayoutError) or sequence_model):
                calls, self._calls = self._calls, None
                calls.remove()
                calls.check(self.model, len(x), self.name, sequences=sequence_model, failed=True)
            raise
        if self._calls is not None:
            calls, self._calls = self._calls, None
            calls.remove()
            calls.check(self.model, len(x), self.name, sequences=sequence_model)
            self._calls_checked = True
        return outs

    def _adopt_carried(self, holders: Sequence[Any]) -> None:
        """A stateful layer put into the model after wrapping: its state is cut at each call too (CUDA graphs,
        which copy the state they were built with, turn off, saying why)."""
        if self.graphs is not None:
            self.graphs.turn_off(f"a layer that carries state ({type(holders[0].module).__name__}) was put into "
                                 "the model after wrapping")
        adopt_carried(self._hooks, self._carried, holders)

    def _graphs_for(self, x_seq: torch.Tensor, no_sync: Any) -> None:
        """Turn the CUDA graphs off, saying why once, for batches they cannot serve (``no_sync``: the
        model's, if it has one)."""
        if self.graphs is None or self.graphs.off is not None:
            return
        if not graphs.runs_on(x_seq.device):
            self.graphs.turn_off(f"the batch is on {x_seq.device.type}; CUDA graphs capture CUDA tensors only")
        elif callable(no_sync):
            self.graphs.turn_off("the model is distributed (it has no_sync(): DDP, FSDP); their gradient "
                                 "all-reduce is not captured")

    def _remove(self) -> None:
        super()._remove()
        if self.graphs is not None:
            self.graphs.clear()

    def _nograd_chunk(self, x_seq: torch.Tensor, run: int) -> int:
        if self.nograd_chunk is not None:
            return self.nograd_chunk
        if any(_normalises_over_batch(norm) for norm in self._batch_norms):
            return self.chunk_size or 1  # the backpropagated steps' normalisation, not the device's choice
        return run if x_seq.device.type == "cuda" else 4

    def _saved_bytes(self, x_seq: torch.Tensor) -> "SavedBytes":
        buffers = [b for b in self.model.buffers()]
        return SavedBytes(storage_keys([x_seq, *self.model.parameters(), *buffers]), packer=self.packer)

    def _measure_chunk(self, x_seq: torch.Tensor, y: torch.Tensor, T: int, sequence_model: bool) -> None:
        """``chunk="auto"``, first batch: the bytes autograd keeps for one step (``step_bytes``), measured
        in a forward and backward of the batch's first step that is then undone (gradients, buffers such
        as batch-norm statistics, neuron state, random state), so that the first batch, too, runs in
        chunks of the size found: the same updates as ``chunk=`` that size."""
        buffers = buffer_copies(self.model)
        # every parameter's .grad aside (the optimizer's and any other's): the pass makes new ones
        grads = [(p, p.grad) for p in self.model.parameters()]
        for p, _ in grads:
            p.grad = None
        rng = rng_states(x_seq.device)
        self.reset_state()
        saved = self._saved_bytes(x_seq)
        try:
            self._backprop(x_seq[:1], y, T=T, first=0, sequence_model=sequence_model, saved=saved)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            for p, grad in grads:
                p.grad = grad
            restore_buffers(buffers)
            set_rng_states(rng, x_seq.device)
            self.reset_state()
        self.step_bytes = saved.total
        self.chunk_size = self._auto_chunk(saved.total, x_seq)

    def _auto_chunk(self, step_bytes: int, x_seq: torch.Tensor) -> int:
        """``chunk="auto"``: the most steps whose saved activations (``step_bytes`` each) fit the budget; a
        batch runs ``min(T, chunk_size)`` steps per backward, so a short first batch does not cap later ones."""
        budget = memory_budget(self.max_memory, x_seq.device)
        return max(1, int(budget // max(step_bytes, 1)))

    @staticmethod
    def _check_finite(finite: List[torch.Tensor], starts: List[int], total: Optional[torch.Tensor]) -> None:
        if finite and not bool(torch.stack(finite).all()):
            first = starts[int((~torch.stack(finite)).nonzero()[0])]
            raise NonFiniteLossError(
                f"the loss at time step {first} is not finite (batch loss {float(total)}); nothing was "
                "updated. Check the input scale and the learning rate (a diverged model gives NaN outputs)."
            )

    def _step_loss(self, out: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        if self._check_tuple_output and not _capturing() and bool(out.detach().ne(0).any()):  # (all zeros: no proof)
            if bool(((out == 0) | (out == 1)).all()):  # (stays checked: every later step() refuses too)
                raise LossError(
                    f"the loss {self.step_loss.name} reads the membrane (element {self.step_loss.output_index} "
                    "of a neuron's (spk, ..., mem) output), but what it gets from the model holds only 0s and "
                    "1s: spikes (from a model that returns one tensor, it gets that tensor). Have the model "
                    "return the last neuron's (spk, mem) (snnTorch: output=True) or use a loss on spikes "
                    "(SF.ce_rate_loss(), loss='ce'); if this output is the membrane, pass output=0 to wrap() "
                    "to say so."
                )
            self._check_tuple_output = False
        loss = evaluate_step_loss(self.step_loss, out, y, t, first=not self._loss_worked,
                                  explain=lambda error: _check_labels(out, y, error))
        self._loss_worked = True
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise LossError(
                f"the loss {self.step_loss.name} at step {t} does not require grad: no trainable parameter "
                "reaches it (all frozen with requires_grad=False, or the output/loss was detached)."
            )
        return loss

    @torch.no_grad()
    def predict(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Class indices ``[B]``: argmax of the model outputs summed over time. Neuron states are reset
        before and after. Runs in whatever train/eval mode the model is in."""
        self._check_wrapped()
        self._check_structure()
        check_sequence_batch(x_seq, None, self.T)
        sequence_model = self._sequence_model()
        if not self._calls_checked:  # predict() before any step(): the same first-call check
            self._calls = NeuronCalls(self.neurons, x_seq.shape[1], self.model if sequence_model else None)
        try:
            self._learn_time_layout(x_seq, sequence_model)
            self.reset_state()
            outs = self._run(x_seq, sequence_model)
        finally:
            if self._calls is not None:
                self._calls.remove()
                self._calls = None
            self.reset_state()
        return torch.stack(outs).sum(0).argmax(-1)

    def _learn_time_layout(self, x_seq: torch.Tensor, sequence_model: bool) -> None:
        """Once, for a multi-step model: whether its forward reduces the output over time
        (:func:`~snn_localrules.rules.base.probe_reduces_time`). Such a model is then called one step at a
        time wherever a learner needs per-step outputs (chunks, SLTT-K's forward-only steps, predict)."""
        if sequence_model and self._reduces_time is None:
            self._reduces_time = probe_reduces_time(self.model, x_seq, self.output, self.reset_state)
            if self._reduces_time and self._calls is not None:
                # a model that reduces over time is called one step at a time: a neuron after the reduction
                # (a head on the rate) ran once in the probe's two-step call, as it should
                self._calls.merged.clear()

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The rule's options (K, sample, seed, T, chunk), SLTT-K's generator, the chunk found by
        ``chunk="auto"``, and the optimizer's and scaler's state (online mode)."""
        state = super().state_dict()
        state.update(K=self.K, sample=self.sample, seed=self.seed, T=self.T, generator=self.generator.get_state(),
                     chunk=self.chunk, max_memory=self.max_memory, chunk_size=self.chunk_size)
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take back a :meth:`state_dict` (the optimizer's and scaler's state too, where this learner has them)."""
        super().load_state_dict(state)
        self.K, self.sample, self.seed, self.T = state["K"], state["sample"], state["seed"], state["T"]
        self.generator.set_state(state["generator"])
        if "chunk" in state:
            self.chunk, self.max_memory, self.chunk_size = state["chunk"], state["max_memory"], state["chunk_size"]
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
