"""TP: Traces Propagation (Pes, Yin, Stuijk, Corradi, 2025, arXiv 2509.13053).

Forward-only and local in space and time. Each neuron layer keeps an eligibility trace of its spikes;
a fixed random projection S carries the one-hot label through the same weights (the *label path*); each
layer's loss contrasts its data traces with its label-path traces. Spikes passed to the next layer and
every neuron's carried state are detached, so no autograd graph spans two layers or two time steps, and the
optimizer steps at every time step. The readout (whatever learnable modules follow the last neuron) sees
the last hidden layer's trace and is trained by its own cross-entropy.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..adapter import NeuronAdapter
from ..errors import LayoutError, LossError, NonFiniteLossError, WrapError
from ..functional.traces import (
    SPATIAL_MODES,
    contrastive_trace_loss,
    distance_soft_targets,
    label_soft_targets,
    update_trace,
)
from ..wrap import ModuleHooks
from .base import (
    DrivesOptimizer,
    NeuronCalls,
    OutputChoice,
    Rule,
    autocast_context,
    autocast_off,
    backward,
    check_optimizer,
    check_clip_grad_norm,
    check_common_options,
    check_output_choice,
    check_finite_gradients,
    check_precision,
    check_sequence_batch,
    guarded_step,
    optimizer_step,
    repeated_neurons_error,
    run_in_time,
    undone_eval_forwards,
    whole_sequence_error,
    whole_sequence_modules,
)
from .sltt import adopt_carried, install_carried_cut, install_temporal_cut

LABEL_BATCH_MODES = ("concat", "separate")


@dataclass
class TPStats:
    """What :meth:`TP.step` reports for one batch.

    :ivar loss: summed over steps, the layer losses plus the readout loss.
    :ivar layer_losses: per hidden layer, summed over steps.
    :ivar readout_loss: the readout's cross-entropy, summed over steps.
    :ivar prediction: class indices ``[B]``, computed as :meth:`TP.predict` computes them (the readout's
        argmax at the last step, or the argmax of the output summed over the steps when the model ends with
        a neuron) but while training on this batch: the last step comes after the updates of the batch's
        first T-1 steps, so :meth:`correct` reads higher than ``predict`` (on a small SHD set, Adam lr 1e-3,
        an epoch's ``correct`` summed to 100% where ``predict`` over the same training set gave 43%).
        Measure accuracy with ``predict``.
    :ivar T: number of time steps.
    :ivar silent_layers: hidden layers (indices) whose data path never spiked in this batch.
    :ivar skipped_steps: with a ``scaler``, the time steps whose optimizer step was skipped because the
        scaled gradients overflowed (the scaler lowered its scale); always empty without one.
    """

    loss: float
    layer_losses: List[float]
    readout_loss: float
    prediction: torch.Tensor
    T: int
    silent_layers: List[int]
    skipped_steps: List[int] = field(default_factory=list)

    def correct(self, y: torch.Tensor) -> int:
        """How many of ``y`` the batch's last step predicted. That step comes after T-1 updates on the same
        batch, so this reads higher than a held-out :meth:`TP.predict`: use it to watch training, not to
        measure it."""
        return int((self.prediction == y.to(self.prediction.device)).sum())


#: the TP learner whose step() or predict() is running: its output hooks act only then, and on its own
#: neurons, so the user's own forward of a wrapped model (a validation loop) and a deep copy of the model
#: run as the plain model, and a deep copy of the learner drives its own copy
_DRIVING: "contextvars.ContextVar[Optional[TP]]" = contextvars.ContextVar("slr_tp_driving", default=None)


@contextlib.contextmanager
def _driving(learner: "TP"):
    token = _DRIVING.set(learner)
    try:
        yield
    finally:
        _DRIVING.reset(token)


def _output_hook(index: int):
    """A neuron's forward hook for TP: its trace, and what it passes on (detached spikes; the last hidden
    layer's trace to the readout)."""
    def hook(module: nn.Module, args: tuple, output: Any):
        learner = _DRIVING.get()  # the learner whose step() or predict() runs now (a deep copy's own)
        if learner is None or learner.neurons[index].module is not module:
            return None  # the user's own forward (a validation loop, a copy of the model): the plain model
        if learner._order is None:
            learner._seen.append(index)
        spikes = output[0] if isinstance(output, (tuple, list)) else output
        # this neuron's own step mode: a single-step neuron inside a multi-step container (a recurrent
        # one) sees [B, ...] although the model is fed [1, B, ...]
        time_dim = learner.neurons[index].multi_step
        step_spikes = spikes[0] if time_dim else spikes
        if learner._is_readout_neuron(index):
            return None  # its spikes reach the model's output with their graph: the readout loss's
        traces = learner._label_traces if learner._label_pass else learner._traces
        # traces are kept in float32 whatever the forward's precision: beta * eps in bfloat16 loses
        # the small contributions of old spikes
        trace = update_trace(traces.get(index), _at_least_float32(step_spikes), learner.trace_decay)
        traces[index] = trace
        # inside a recurrent container the container passes the trace on (below): what the neuron
        # returns is also what the container feeds back at the next step, which must stay its spikes
        to_readout = learner._is_last_hidden(index) and index not in learner._passed_by_container
        passed = trace.to(step_spikes.dtype) if to_readout else step_spikes
        return _replace_output(output, passed.detach(), time_dim)

    return hook


def _replace_output(output: Any, passed: torch.Tensor, time_dim: bool) -> Any:
    if time_dim:
        passed = passed.unsqueeze(0)
    if isinstance(output, (tuple, list)):
        return type(output)([passed, *output[1:]])
    return passed


def _passes_on(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Dropout" in name or name == "Identity"


def _container_hook(container: int, index: int):
    """The forward hook of a recurrent container around the last hidden layer's neuron ``index``: the
    readout gets the neuron's trace from the container, after the container kept the neuron's spikes
    as the output it feeds back."""
    def hook(module: nn.Module, args: tuple, output: Any):
        learner = _DRIVING.get()
        if (learner is None or learner.neurons[container].module is not module or not learner._is_last_hidden(index)
                or learner._passed_by_container.get(index) != container):
            return None
        traces = learner._label_traces if learner._label_pass else learner._traces
        step = output[0] if isinstance(output, (tuple, list)) else output
        trace = traces[index]
        return _replace_output(output, trace.to(step.dtype).detach(), learner.neurons[container].multi_step)

    return hook


def _last_leaf(module: nn.Module, stop_at: set) -> Optional[nn.Module]:
    """The last module in registration order with no children, a neuron layer counting as one piece (a
    SpikingJelly neuron holds its surrogate function as a child module)."""
    if id(module) in stop_at or not list(module.children()):
        return module
    for child in reversed(list(module.children())):
        last = _last_leaf(child, stop_at)
        if last is not None:
            return last
    return None


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@dataclass
class _GlobalContrast:
    group: Any
    sizes: List[int]
    labels: torch.Tensor  # [sum(sizes)] every process's labels, in rank order
    rows: slice  # this process's samples in the global batch


class TP(DrivesOptimizer, Rule):
    """Traces Propagation. Built by ``slr.wrap(model, rule="tp", optimizer=opt, num_classes=C)``.

    :param optimizer: optimizer over the model's parameters; it steps at every time step (as the reference
        code does: one step per batch learns far worse).
    :param num_classes: number of classes O (size of the label path's one-hot input).
    :param trace_decay: beta of ``eps[t] = beta * eps[t-1] + s[t]``.
    :param seed: seed of the fixed random label projection S.
    :param label_scale: scale of S's entries relative to the mean absolute data input of the first batch
        (S is drawn uniform in [0, 1) and rescaled once, then fixed and saved in ``state_dict``).
    :param output: which element of a tuple model output is the readout (index or callable).
    :param multi_step: feed ``[1, B, ...]`` chunks (multi-step models) or ``[B, ...]`` steps; default from
        the neurons' step mode.
    :param spatial: how conv-layer traces ``[B, C, H, W]`` are compared: ``"mean"`` (default, the authors'
        code) takes similarities and label-path distances per position over the channels and averages them
        over the H*W positions; ``"flatten"`` compares whole ``C*H*W`` vectors, whose logits grow with the
        map's area and saturate the softmax on large maps. No effect on ``[B, N]`` layers.
    :param label_batch: how the label path runs. ``"concat"`` (default): data and label inputs go through
        the model as one ``2B`` batch per step. ``"separate"``: two calls of ``B`` per step, the neurons'
        carried state swapped between a data-path and a label-path copy. Both give the same updates (tested
        to float tolerance) except with batch norm: ``"concat"`` normalises over the ``2B`` mixed samples,
        ``"separate"`` over each path's own ``B`` samples, and its running statistics then get two updates
        per step (data, then label). ``"concat"`` is the default because it was faster on the project's
        CPU machine (one larger call instead of two) at the same peak memory (see the README).
    :param autocast: mixed precision: ``None``/``False`` (off), ``True`` (the device's default autocast
        dtype) or a dtype. The model's forward runs under ``torch.autocast``; traces are kept and the
        layer losses computed in float32 (a bfloat16 trace would round ``beta * eps`` away), backward
        runs outside autocast.
    :param scaler: a ``torch.amp.GradScaler`` (float16). TP steps the optimizer at every time step, so
        the scaler scales, unscales, checks and updates at every time step, as GradScaler expects once
        per optimizer step; a step whose gradients overflow is skipped (``stats.skipped_steps``).
    :param clip_grad_norm: before each optimizer step (every time step), scale the gradients of the
        optimizer's parameters (unscaled first with a ``scaler``) down to a total 2-norm of at most this.
        ``None``: no clipping.
    :param global_contrast: under ``DistributedDataParallel``, compare each sample's traces with the
        label-path traces of the *whole* global batch (all processes), so that training on P processes
        equals training on their concatenated batch in one process. Costs one all-gather of each
        layer's label traces per step (``[B, ...]``: measured 0.63x the gradients' all-reduce traffic on
        the benchmarks' VGG-like net, see the README). ``None``
        (default): on when the model is DDP-wrapped in a group of more than one process. ``False``:
        each process contrasts within its own batch only (a smaller contrastive batch).

    **Distributed training.** Wrap the ``DistributedDataParallel`` model (``slr.wrap(ddp_model, rule="tp",
    ...)``). TP takes an optimizer step at every time step, so DDP all-reduces the gradients once per time
    step (there is no step to defer, unlike SLTT). The label projection's scale is the mean over the
    processes of their first batch's input scale, so every process draws the same ``S``. Batch norm is
    per process unless you convert it (``nn.SyncBatchNorm.convert_sync_batchnorm``), as in any DDP run.
    Freezing layers under DDP leaves their parameters without gradients: build the DDP model with
    ``find_unused_parameters=True``.

    **Readout convention.** If a learnable module follows the last neuron (a linear readout), the last
    neuron is the last hidden layer, its *trace* is passed on (detached), and the readout is trained by CE on
    its output; the prediction is the argmax of the readout at the last step. If the model ends with a
    neuron (spike-count output), that neuron's layer is the readout: it gets the previous layer's trace,
    is trained by CE on its own spikes at each step, and the prediction is the argmax of its spike counts.
    """

    name = "tp"

    def __init__(
        self,
        model: nn.Module,
        neurons: Sequence[NeuronAdapter],
        optimizer: Optional[torch.optim.Optimizer] = None,
        num_classes: Optional[int] = None,
        trace_decay: float = 0.8,
        seed: int = 0,
        label_scale: float = 1.0,
        output: OutputChoice = None,
        multi_step: Optional[bool] = None,
        spatial: str = "mean",
        label_batch: str = "concat",
        autocast: Union[None, bool, torch.dtype] = None,
        scaler: Optional[Any] = None,
        global_contrast: Optional[bool] = None,
        clip_grad_norm: Optional[float] = None,
    ):
        super().__init__(model, neurons)
        if optimizer is None:
            raise WrapError("rule='tp' trains online and needs optimizer=... (e.g. torch.optim.Adam(model.parameters(), 1e-3)).")
        check_optimizer(optimizer, model)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise WrapError(f"rule='tp' needs num_classes=<int >= 2> for its label path, got {num_classes!r}.")
        if not 0.0 <= trace_decay < 1.0:
            raise WrapError(f"trace_decay must be in [0, 1), got {trace_decay!r}.")
        try:  # a Python, numpy or 0-d torch number
            number = None if isinstance(label_scale, (bool, str)) else float(label_scale)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or number <= 0:
            raise WrapError(
                f"label_scale must be a positive number (the label path's input scale relative to the data's), "
                f"got {label_scale!r}."
            )
        check_common_options(seed, None, multi_step, seed_may_be_none=False)
        check_output_choice(output)
        if spatial not in SPATIAL_MODES:
            raise WrapError(f"spatial must be one of {', '.join(map(repr, SPATIAL_MODES))}, got {spatial!r}.")
        if label_batch not in LABEL_BATCH_MODES:
            raise WrapError(
                f"label_batch must be one of {', '.join(map(repr, LABEL_BATCH_MODES))}, got {label_batch!r}."
            )
        check_precision(autocast, scaler, online=True)
        check_clip_grad_norm(clip_grad_norm, online=True)
        if global_contrast not in (None, True, False):
            raise WrapError(f"global_contrast must be None, True or False, got {global_contrast!r}.")
        explicit = [n.describe() for n in self.neurons if n.explicit_state]
        if explicit:
            raise WrapError(
                f"rule='tp' runs the time loop itself, but the state of {', '.join(explicit)} is passed in by "
                "the model's own forward (as snnTorch's with init_hidden=False); let the neurons keep their "
                "state (snnTorch: init_hidden=True)."
            )
        whole = whole_sequence_modules(model, self.neurons)
        if whole:
            raise whole_sequence_error(
                whole, "rule='tp' feeds the model one time step per call",
                "Train this model with SLTT (zero-change mode, or online with chunk at least T), or put a module "
                "that takes one step at a time in its place.")
        self.optimizer = optimizer
        self.num_classes = num_classes
        self.trace_decay = float(trace_decay)
        self.seed = int(seed)
        self.label_scale = float(label_scale)
        self.output = output
        self.multi_step = multi_step
        self.spatial = spatial
        self.label_batch = label_batch
        self.autocast = autocast
        self.scaler = scaler
        self.global_contrast = global_contrast
        self.clip_grad_norm = clip_grad_norm
        self.projection: Optional[torch.Tensor] = None  # S, [O, *input_shape], made at the first batch
        layers = {id(n.module) for n in self.neurons if n.is_layer}
        last = _last_leaf(model, stop_at=layers)
        self.neuron_output = last is not None and id(last) in layers
        self._order: Optional[List[int]] = None  # neurons in forward order, learned at the first call
        self._seen: List[int] = []
        self._traces: Dict[int, torch.Tensor] = {}
        self._carried: List[Any] = []  # the other layers' carried state (install)
        self._label_traces: Dict[int, torch.Tensor] = {}  # label path's traces with label_batch="separate"
        self._label_pass = False  # True while the label path's call of label_batch="separate" runs
        self._warned_silent = False
        self._warned_one_class = False
        self.frozen: set = set()  # hidden-layer positions and/or "readout" whose loss is not applied

    # -- fine-tuning -----------------------------------------------------------------------------
    def freeze(self, layers: Iterable[Union[int, str]]) -> "TP":
        """Stop training the given layers: hidden-layer positions (0 = first neuron layer in forward
        order) and/or ``"readout"``. Their local losses are no longer applied, so their parameters get no
        gradient and the optimizer leaves them alone (BN running statistics still update in train mode).
        Use it to adapt a pretrained model (BPTT, SLTT or TP) on a few samples: e.g. freeze every hidden
        layer but the last. Returns the learner."""
        for layer_id in layers:
            if layer_id != "readout" and (not isinstance(layer_id, int) or layer_id < 0):
                raise WrapError(f"freeze() takes hidden-layer positions (ints >= 0) or 'readout', got {layer_id!r}.")
            self.frozen.add(layer_id)
        return self

    def unfreeze(self, layers: Optional[Iterable[Union[int, str]]] = None) -> "TP":
        """Train the given layers again (all, if ``layers`` is None). Returns the learner."""
        self.frozen = set() if layers is None else self.frozen - set(layers)
        return self

    # -- hooks -----------------------------------------------------------------------------------
    def install(self, hooks: ModuleHooks) -> None:
        install_temporal_cut(hooks, self.neurons)
        self._carried = install_carried_cut(hooks, self.model, self.neurons)
        #: (module, hook id) of TP's output hooks: kept after the user's own hooks on those modules
        self._output_hooks = []
        for index, neuron in enumerate(self.neurons):
            if neuron.is_layer:
                handle = hooks.forward_hook(neuron.module, _output_hook(index))
                self._output_hooks.append((neuron.module, handle.id))
        self._passed_by_container = self._outer_containers()
        for index, container in self._passed_by_container.items():
            module = self.neurons[container].module
            self._output_hooks.append((module, hooks.forward_hook(module, _container_hook(container, index)).id))

    def _output_hooks_last(self) -> None:
        """Run TP's output hooks after the user's own forward hooks on the same modules, those added after
        wrapping too: a hook that scales a neuron's spikes then changes what the trace is made of, as when
        it was there before wrapping (TP's hook, which passes detached spikes or the trace on, ran first)."""
        for module, hook_id in self._output_hooks:
            hooks = module._forward_hooks
            if hook_id in hooks and hasattr(hooks, "move_to_end") and next(reversed(hooks)) != hook_id:
                hooks.move_to_end(hook_id)

    def _adopt_carried(self, holders: Sequence[Any]) -> None:
        """A stateful layer put into the model after wrapping: its state is cut at each call, and swapped
        between the label paths, as the others'."""
        adopt_carried(self._hooks, self._carried, holders)

    def _outer_containers(self) -> Dict[int, int]:
        """``{neuron: container}`` for each neuron layer inside modules that carry state but are no layer of
        their own (recurrent containers): the outermost of them, whose output the next layer gets. The first
        call's layer-order forward (:meth:`_learn_layer_order`) drops a pair where something computes after
        the neuron inside the container: such a neuron keeps passing its trace on itself, and what the
        container returns and feeds back is computed from it."""
        def inside(inner: nn.Module, outer: nn.Module) -> bool:
            return inner is not outer and any(m is inner for m in outer.modules())

        containers = [c for c, n in enumerate(self.neurons) if not n.is_layer]
        pairs: Dict[int, int] = {}
        for index, neuron in enumerate(self.neurons):
            around = [c for c in containers if neuron.is_layer and inside(neuron.module, self.neurons[c].module)]
            outer = [c for c in around if not any(inside(self.neurons[c].module, self.neurons[o].module)
                                                  for o in around)]
            if outer:  # checked against the forward at the first call (_learn_layer_order)
                pairs[index] = outer[0]
        return pairs

    def _is_readout_neuron(self, index: int) -> bool:
        return self.neuron_output and self._order is not None and index == self._order[-1]

    def _is_last_hidden(self, index: int) -> bool:
        if self._order is None:
            return False
        hidden = self._order[:-1] if self.neuron_output else self._order
        return bool(hidden) and index == hidden[-1]

    # -- label path ------------------------------------------------------------------------------
    def _label_inputs(self, x_step: torch.Tensor, y: torch.Tensor, x_seq: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            gen = torch.Generator().manual_seed(self.seed)
            s = torch.rand((self.num_classes, *x_step.shape[1:]), generator=gen)
            # the whole first batch's magnitude: its first frame may be blank (an event stream's onset)
            # summed one step at a time: no temporary the size of the whole input (TP's memory is flat in T)
            level = sum(float(x_t.detach().abs().sum(dtype=torch.float32)) for x_t in x_seq) / max(x_seq.numel(), 1)
            group = distributed.model_group(self.model)
            if group is not None:  # every process must draw the same S: scale by the mean over processes
                level = distributed.mean_over_group(level, group, x_step.device)
            if level == 0.0:  # an all-zero batch: no magnitude to match yet; the next batch makes S
                return torch.zeros((len(y), *x_step.shape[1:]), device=x_step.device, dtype=self._weights_dtype(x_step))
            scale = level / max(s.mean().item(), 1e-12)
            # in the dtype of the weights it feeds (a float16 first batch to a float32 model is promoted by
            # the concatenation, as every later one is), else the input's
            self.projection = (s * scale * self.label_scale).to(x_step.device, self._weights_dtype(x_step))
        elif self.projection.shape[1:] != x_step.shape[1:]:
            raise WrapError(
                f"the label projection was made for inputs {tuple(self.projection.shape[1:])}, this batch has "
                f"{tuple(x_step.shape[1:])}; TP needs one input shape per learner."
            )
        return self.projection[y]

    def _weights_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the model's weights (the label path feeds them), else ``x``'s."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), x.dtype)

    # -- training --------------------------------------------------------------------------------
    def _hidden_order(self) -> List[int]:
        assert self._order is not None
        return self._order[:-1] if self.neuron_output else list(self._order)

    @guarded_step(finite_input=True, restore=("projection",))
    def step(self, x_seq: torch.Tensor, y: torch.Tensor) -> TPStats:
        """One batch of forward-only local learning, an optimizer step at every time step.

        :param x_seq: ``[T, B, ...]``; :param y: class indices ``[B]``.
        """
        T = x_seq.shape[0]  # wrapped, layout and devices are checked by @guarded_step
        if int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise LossError(f"labels must be in [0, {self.num_classes}); got range [{int(y.min())}, {int(y.max())}]. "
                            "Fix the labels, or wrap with the right num_classes=.")
        B = x_seq.shape[1]
        sequence_model = self._sequence_model()
        group = distributed.model_group(self.model)  # the DDP process group, or None
        if group is not None and self.frozen and not getattr(self.model, "find_unused_parameters", False):
            raise WrapError(
                f"layers {sorted(self.frozen, key=str)} are frozen, so their parameters get no gradient, which "
                "DistributedDataParallel refuses by default; build it with find_unused_parameters=True."
            )
        contrast = self._contrast_plan(y, group)
        classes = (y if contrast is None else contrast.labels).unique().numel()
        if classes < 2 and not self._warned_one_class:
            self._warned_one_class = True
            warnings.warn(
                "TP: this batch holds samples of a single class; each layer's loss contrasts samples of "
                "different classes, so the hidden layers get no update from such a batch (the readout still "
                "learns). Mix classes in every batch (a shuffled loader), or freeze the hidden layers.",
                RuntimeWarning, stacklevel=3,
            )
        self._output_hooks_last()
        with _driving(self):
            return self._step(x_seq, y, T, B, sequence_model, group, contrast)

    def _step(self, x_seq: torch.Tensor, y: torch.Tensor, T: int, B: int, sequence_model: bool, group: Any,
              contrast: Optional["_GlobalContrast"]) -> TPStats:
        self.reset_state()
        layer_sums: Dict[int, float] = {}
        readout_sum = 0.0
        spiked: Dict[int, bool] = {}
        skipped: List[int] = []
        last_output = None
        separate = self.label_batch == "separate"
        try:
            if separate:
                # both paths start from the rest state; each keeps its own copy of the carried state
                data_state = label_state = self._neuron_states()
            for t in range(T):
                x_t = x_seq[t]
                label_in = self._label_inputs(x_t, y, x_seq)
                with autocast_context(self.autocast, x_t.device.type):
                    if self._order is None:  # the label inputs: the input's shape in the model's dtype
                        self._learn_layer_order(label_in, sequence_model)
                    if separate:
                        self._set_neuron_states(data_state)
                        (out,) = run_in_time(self.model, x_t.unsqueeze(0), sequence_model, self.output)
                        data_state = self._neuron_states()
                        self._set_neuron_states(label_state)
                        self._label_pass = True
                        try:
                            run_in_time(self.model, label_in.unsqueeze(0), sequence_model, self.output)
                        finally:
                            self._label_pass = False
                        label_state = self._neuron_states()
                    else:
                        inputs = torch.cat([x_t, label_in], 0)
                        (out,) = run_in_time(self.model, inputs.unsqueeze(0), sequence_model, self.output)
                # the losses in float32, outside autocast, the caller's own too (traces are float32 already)
                with autocast_off(x_t.device.type):
                    losses = []
                    label_prev: Optional[torch.Tensor] = None
                    hidden = self._hidden_order()
                    bad = [f for f in self.frozen if f != "readout" and f >= len(hidden)]
                    if bad:
                        raise WrapError(f"frozen layer(s) {bad} do not exist: the model has {len(hidden)} hidden layers.")
                    for position, index in enumerate(hidden):
                        if separate:
                            data, label = self._traces[index], self._label_traces[index]
                        else:
                            trace = self._traces[index]
                            data, label = trace[:B], trace[B:]
                        if contrast is not None:  # compare with the label paths of every process's samples
                            label = distributed.gather_rows(label, contrast.group, contrast.sizes)
                        if position == 0:
                            targets = label_soft_targets(y if contrast is None else contrast.labels)
                        else:
                            targets = distance_soft_targets(label_prev, spatial=self.spatial)
                        if contrast is not None:
                            targets = targets[contrast.rows]
                        loss_l = contrastive_trace_loss(data, label, targets.to(data.dtype), self.spatial)
                        if position not in self.frozen:
                            losses.append(loss_l)
                        layer_sums[position] = layer_sums.get(position, 0.0) + float(loss_l.detach())
                        spiked[position] = spiked.get(position, False) or bool(data.detach().any())
                        label_prev = label
                    readout = _at_least_float32(out[:B])
                    if readout.dim() != 2 or readout.shape[-1] != self.num_classes:
                        raise WrapError(
                            f"the model's output has shape {tuple(readout.shape)} per step, but rule='tp' was "
                            f"wrapped with num_classes={self.num_classes}: the readout must give [B, "
                            f"{self.num_classes}]. Wrap with the readout's width as num_classes, or fix the readout."
                        )
                    readout_loss = F.cross_entropy(readout, y)
                readout_sum += float(readout_loss.detach())
                if "readout" not in self.frozen:
                    losses.append(readout_loss)
                total = sum(losses, torch.zeros((), device=readout.device))
                if not distributed.finite_on_every_process(total, group):
                    raise NonFiniteLossError(f"the TP loss at time step {t} is {float(total.detach())}; check the input scale.")
                self.optimizer.zero_grad(set_to_none=True)
                if total.requires_grad:
                    backward(total, self.scaler)
                if self.scaler is None:  # (a GradScaler skips a step whose gradients are not finite)
                    check_finite_gradients(self.model, [p for g in self.optimizer.param_groups for p in g["params"]])
                if optimizer_step(self.optimizer, self.scaler, self.clip_grad_norm):
                    skipped.append(t)
                # the prediction: argmax of the readout at the last step, or of the output neuron's spike counts
                last_output = readout.detach() if last_output is None or not self.neuron_output \
                    else last_output + readout.detach()
                self._detach_traces()
        finally:
            self.reset_state()
        silent = [p for p, fired in spiked.items() if not fired]
        if silent and not self._warned_silent:
            self._warned_silent = True
            warnings.warn(
                f"TP: hidden layer(s) {silent} never spiked in this batch. A silent layer has all-zero traces "
                "and gets no gradient, so TP cannot start from it: raise the input scale, lower the threshold "
                "(SpikingJelly's v_threshold, snnTorch's threshold) or slow the decay (a larger SpikingJelly "
                "tau, snnTorch beta).",
                RuntimeWarning,
                stacklevel=4,  # _step, step, guarded_step, the caller
            )
        return TPStats(
            loss=sum(layer_sums.values()) + readout_sum,
            layer_losses=[layer_sums[p] for p in sorted(layer_sums)],
            readout_loss=readout_sum,
            prediction=last_output.argmax(-1),
            T=T,
            silent_layers=silent,
            skipped_steps=skipped,
        )

    def _contrast_plan(self, y: torch.Tensor, group: Any) -> Optional["_GlobalContrast"]:
        """Under DDP (``group``) with ``global_contrast``: the group, every process's batch size, the global
        labels and this process's rows in the global batch (one small all-gather per batch); else None."""
        if self.global_contrast and group is None:
            raise WrapError(
                "global_contrast=True needs a DistributedDataParallel model in an initialised process group "
                "of more than one process; in a single process leave it at None."
            )
        if group is None or self.global_contrast is False:
            return None
        sizes = distributed.gather_sizes(len(y), group, y.device)
        labels = distributed.gather_rows(y, group, sizes)
        start = distributed.row_offset(group, sizes)
        return _GlobalContrast(group, sizes, labels, slice(start, start + len(y)))

    @torch.no_grad()
    def _learn_layer_order(self, inputs: torch.Tensor, sequence_model: bool) -> None:
        """Record the order in which the neurons run (the layer order, whatever the model's code looks
        like) with one forward in eval mode, undone afterwards (:func:`~.base.undone_eval_forwards`)."""
        self._seen = []
        # the modules with weights of their own (frozen ones too: a frozen readout is still the readout),
        # neither inside a neuron nor holding one (the model itself, a block: it finishes after its
        # neurons): how many neurons had run when each finished; those that ran after the last are the readout
        inside_neurons = {id(m) for n in self.neurons for m in n.module.modules()}
        neuron_ids = {id(n.module) for n in self.neurons}
        holders = {id(m) for m in self.model.modules() if any(id(sub) in neuron_ids for sub in m.modules())}
        # and inside the recurrent containers that may pass a neuron's trace on: whatever computes after that
        # neuron there (a dropout or an identity passes its output on as it is)
        in_layers = {id(m) for n in self.neurons if n.is_layer for m in n.module.modules()}
        in_containers = {id(m) for c in self._passed_by_container.values() for m in self.neurons[c].module.modules()
                         if m is not self.neurons[c].module}

        def watched(m: nn.Module) -> bool:
            if id(m) in holders:
                return False
            if id(m) in in_containers:
                return id(m) not in in_layers and not _passes_on(m)
            return id(m) not in inside_neurons and any(True for _ in m.parameters(recurse=False))

        after: List[Tuple[int, int]] = []  # (module, neurons run when it finished)
        handles = [m.register_forward_hook(lambda m, *_: after.append((id(m), len(self._seen))))
                   for m in self.model.modules() if watched(m)]
        layout_error = None
        # fed [1, B, ...], one-step-per-call neurons must still get [B, ...] (snnTorch's take no sequences)
        calls = NeuronCalls(self.neurons, inputs.shape[0], self.model) if sequence_model else None
        with undone_eval_forwards(self.model, self.reset_state):
            try:
                run_in_time(self.model, inputs.unsqueeze(0), sequence_model, self.output)
            except LayoutError as error:  # a forward that loops over time gives no per-step output either:
                layout_error = error      # the repeated neurons below say so, rather than blame the input
            except Exception:
                if calls is not None:  # (the shapes that went wrong may fail anywhere after such a neuron)
                    calls.remove()
                    calls.check(self.model, 1, self.name, sequences=True, failed=True)
                raise
            finally:
                if calls is not None:
                    calls.remove()
                for handle in handles:
                    handle.remove()
        if calls is not None:  # TP keeps a trace per sample: a neuron handed [1, B, ...] has no sample rows
            calls.check(self.model, 1, self.name, sequences=True, failed=True)
        repeated = [self.neurons[i] for i in sorted(set(self._seen)) if self._seen.count(i) > 1]
        if repeated:
            raise repeated_neurons_error(self.model, repeated, self.name)
        if layout_error is not None:
            raise layout_error
        self._order = list(dict.fromkeys(self._seen))
        # the model ends with a neuron when no module with weights runs after the last neuron (what follows
        # it, if anything, has none: a VotingLayer, a pool); registration order may differ from this
        self.neuron_output = bool(self._seen) and not any(ran == len(self._seen) for module, ran in after
                                                          if module not in in_containers)
        # a container passes its neuron's trace on only if nothing computes after the neuron inside it, in
        # the forward's order (whatever order the modules were registered in)
        for index, container in list(self._passed_by_container.items()):
            inside = {id(m) for m in self.neurons[container].module.modules()}
            ran_at = self._seen.index(index) if index in self._seen else len(self._seen)
            if any(module in inside and ran > ran_at for module, ran in after):
                del self._passed_by_container[index]
        if not self._hidden_order():
            raise WrapError("rule='tp' needs at least one hidden neuron layer before the readout.")

    def _detach_traces(self) -> None:
        for traces in (self._traces, self._label_traces):
            for key, trace in traces.items():
                traces[key] = trace.detach()

    def _neuron_states(self) -> List[Dict[str, Any]]:
        """The state carried from step to step: the neurons', and other layers' (a ``SynapseFilter``'s
        current, a ``Delay``'s queue: the plugins' ``slr_carried_state``)."""
        return [{name: _own_containers(value) for name, value in holder.get_state().items()}
                for holder in (*self.neurons, *self._carried)]

    def _set_neuron_states(self, states: List[Dict[str, Any]]) -> None:
        """Put ``states`` back. Lists and dicts are copied both ways: a layer that changes its state in
        place (the ``Delay`` queue) leaves the kept copies as they were."""
        for holder, state in zip((*self.neurons, *self._carried), states):
            holder.set_state({name: _own_containers(value) for name, value in state.items()})

    def reset_state(self) -> None:
        super().reset_state()
        self._traces = {}
        self._label_traces = {}

    @torch.no_grad()
    def predict(self, x_seq: torch.Tensor, over: str = "last") -> torch.Tensor:
        """Class indices ``[B]``: argmax of the readout at the last step, as the paper evaluates
        (``over="last"``), or of the readout summed over all steps (``over="sum"``: for inputs whose last
        steps are silent, where the traces have decayed by then). A model that ends with a neuron: argmax of
        its spike counts, either way."""
        if over not in ("last", "sum"):
            raise WrapError(f"over must be 'last' (the readout at the last step) or 'sum' (summed over the "
                            f"steps), got {over!r}.")
        self._check_wrapped()
        self._check_structure()
        check_sequence_batch(x_seq)
        sequence_model = self._sequence_model()
        self._output_hooks_last()
        with _driving(self):
            if self._order is None:
                self._learn_layer_order(x_seq[0], sequence_model)
            self.reset_state()
            return self._predict(x_seq, sequence_model, over)

    def _predict(self, x_seq: torch.Tensor, sequence_model: bool, over: str = "last") -> torch.Tensor:
        try:
            # one step per call: the trace hooks advance one step at a time
            outs = [run_in_time(self.model, x_seq[t : t + 1], sequence_model, self.output)[0] for t in range(len(x_seq))]
        finally:
            self.reset_state()
        if self.neuron_output or over == "sum":
            return torch.stack([_at_least_float32(o) for o in outs]).sum(0).argmax(-1)
        return outs[-1].argmax(-1)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The rule's options, the fixed label projection, the frozen layers, and the optimizer's and
        scaler's state."""
        state = super().state_dict()
        state.update(
            num_classes=self.num_classes, trace_decay=self.trace_decay, seed=self.seed,
            label_scale=self.label_scale, projection=self.projection, frozen=sorted(self.frozen, key=str),
            spatial=self.spatial, label_batch=self.label_batch, optimizer=self.optimizer.state_dict(),
        )
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take back a :meth:`state_dict` (the label projection and the optimizer's state too)."""
        super().load_state_dict(state)
        self.num_classes, self.trace_decay = state["num_classes"], state["trace_decay"]
        self.seed, self.label_scale = state["seed"], state["label_scale"]
        self.projection = state["projection"]
        self.frozen = set(state.get("frozen", ()))
        self.spatial = state.get("spatial", self.spatial)
        self.label_batch = state.get("label_batch", self.label_batch)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


def _own_containers(value: Any) -> Any:
    """``value`` with its lists and dicts copied (not the tensors in them): a layer that appends to its
    state in place (SpikingJelly's ``Delay`` queue) must not write into the other path's copy."""
    if isinstance(value, list):
        return [_own_containers(v) for v in value]
    if isinstance(value, dict):
        return {k: _own_containers(v) for k, v in value.items()}
    return value
