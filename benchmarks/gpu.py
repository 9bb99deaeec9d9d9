"""Peak memory and time per batch on a GPU: SpikingJelly's BPTT, memopt and online SLTT against this plugin.

A VGG-11-like SNN (the SLTT authors' DVS network: eight 3x3 convs 64,128,256,256,512,512,512,512 with batch
norm and SpikingJelly ``LIFNode`` (tau=2, decay_input, soft reset, detach_reset, sigmoid surrogate: the
settings of ``memory_vs_T.py``), a 2x2 pool after convs 2, 4, 6 and 8, adaptive average pool to 1x1, linear
readout to 10 classes) trains on random event-like input (Bernoulli 0.2, 2x48x48) for T in {10, 20} and
batch B in {32, 128}. The methods:

* ``sj_bptt``    -- SpikingJelly multi-step model, its default LIF implementation (on CUDA SpikingJelly 2.x
  picks its own CUDA or Triton kernel; ``SJ_LIF_CUDA_IMPLEMENTATION`` selects one), one backward.
* ``sj_memopt``  -- SpikingJelly 2's ``memopt.optimize_memory`` (level 1, conv and LIF layers) on that model.
* ``sj_online``  -- SpikingJelly's own online SLTT: ``SLTTLIFNode`` driven by ``ottt_online_training``.
* ``sltt_c1``, ``sltt_c2``, ``sltt_c5`` -- this plugin's online SLTT, ``chunk=1, 2, 5``.
* ``sltt_auto``  -- the same with ``chunk="auto"`` and ``max_memory=--auto-max-memory``.
* ``sltt_k2``    -- SLTT-2 (``K=2``, chunk 1, ``nograd_chunk=T``: a run of forward-only steps per call).
* ``sltt_fused`` -- zero-change mode: ``slr.wrap(model, rule="sltt")`` and the user's BPTT loop unchanged.
* ``sltt_c1_plain``, ``sltt_fused_plain`` -- chunk 1 and zero-change mode with ``pack_spikes=False,
  recompute_membrane=False``: what the two memory options cost in time and save in memory on a GPU.

Every (method, T, B) cell runs in a fresh worker process (``--in-process``: all in this one, which on CUDA
saves the interpreter start, CUDA context and kernel compilation per cell; the peak is reset per cell; on
CPU such cells have no memory figure, since a process's peak RSS cannot be reset). Peak memory: on CUDA the growth of
``torch.cuda.max_memory_allocated`` over the memory allocated once the model, optimizer and data are on the
GPU; on CPU the growth of the peak RSS over the RSS then. Time: the median over ``--timed`` batches after
``--warmup`` batches, ``torch.cuda.synchronize()`` before and after each. An out-of-memory cell reads "OOM";
a method this SpikingJelly lacks reads "n/a" with the reason. The table gives absolute figures and the
ratios to ``sj_bptt`` of the same run; the target checks follow. JSON (with the GPU's name, the torch,
SpikingJelly, CuPy and Triton versions, the LIF implementation SpikingJelly used and every method's
settings) goes to ``benchmarks/results/gpu.json`` (``results/quick/`` with ``--quick``), a PNG beside it.

``--profile`` adds one torch.profiler batch per cell and prints, per mode, the share of its wall time the
GPU spent in kernels, and how the host's time splits into PyTorch op dispatch, CUDA runtime calls
(launches), waiting for the GPU (synchronize) and the rest (Python). On CPU there are no kernels or
launches: the op time includes the computation itself, and only op vs Python is reported.

On a GPU machine (with a CUDA build of torch)::

    pip install --no-deps spikingjelly==2.0.0 && pip install numpy loguru pluggy tqdm matplotlib
    pip install --no-deps -e .                     # or: export PYTHONPATH=$PWD
    python benchmarks/gpu.py                       # T 10 20, B 32 128, every method, 10 timed batches
    python benchmarks/gpu.py --profile --Ts 10 --batches 32
    python benchmarks/gpu.py --resume              # after a time limit: runs only the missing cells
    python benchmarks/gpu.py --in-process          # every cell in one process: minutes instead of many
    python benchmarks/gpu.py --plot-only           # redraw benchmarks/results/gpu.png from the JSON
    SJ_LIF_CUDA_IMPLEMENTATION=triton python benchmarks/gpu.py --methods sj_bptt --out /tmp/triton.json
    python benchmarks/gpu.py --cuda-graphs --out benchmarks/results/gpu_graphs.json  # online steps as graphs

A GPU machine without network access: here, ``python3 -m pip download --no-deps -d .whl spikingjelly==2.0.0
loguru`` (both are pure-Python wheels), carry ``.whl`` there, and run ``python3 -m pip install -q --no-index
--no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD`` before the commands above
(torch, numpy, pluggy, tqdm and matplotlib must be there already; Triton too for SpikingJelly's fused LIF).

SpikingJelly's pip wheel has no prebuilt native CUDA operators (they need a source build with
``SJ_BUILD_NATIVE_CUDA=1``), so on CUDA its ``auto`` choice is then Triton; the JSON records the chosen
implementation and why the others were unavailable (``config.sj_bptt_lif_implementation``), and which
path this plugin's neurons took (``sltt_neuron_path``: fused multi-step or stepped). The full grid is 44
cells, each a fresh process (start-up, CUDA context and Triton compilation included): where one command
may run only 10 minutes, repeat the same command with ``--resume`` until every cell is in (the JSON is
rewritten after every cell, and ``--resume`` runs only the missing ones), or run it ``--in-process``.

This plugin fuses its multi-step neurons on CUDA only with ``SLR_FUSED_CUDA=1`` (until the fused
function is checked against SpikingJelly's CUDA neurons there: ``pytest tests/test_sltt_multistep.py -k
cuda``); run the grid with and without it, and the ``sltt_neuron_path`` column tells which ran.

On CPU, ``python benchmarks/gpu.py --quick --device cpu`` is a smoke test (T=4, B=4, width 0.125, 16x16
input, 1 timed batch); its timings on a shared machine are not results.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts)
from memory_vs_T import (  # noqa: E402  (shared probes and the worker launcher: one definition)
    MB, current_rss_bytes, import_sj_online_learning, launch_worker, make_optimizer, peak_rss_bytes,
)

METHODS = ("sj_bptt", "sj_memopt", "sj_online", "sltt_c1", "sltt_c2", "sltt_c5", "sltt_auto", "sltt_k2",
           "sltt_fused", "sltt_c1_plain", "sltt_fused_plain")
#: the ``*_plain`` methods: without the two memory options whose time a GPU has yet to show
PLAIN = {"pack_spikes": False, "recompute_membrane": False}
SLTT_CHUNKS = {"sltt_c1": 1, "sltt_c2": 2, "sltt_c5": 5}
FULL_TS, FULL_BATCHES = (10, 20), (32, 128)
QUICK_TS, QUICK_BATCHES, QUICK_WIDTH, QUICK_SIZE = (4,), (4,), 0.125, 16
RESULT_TAG = "GPU_BENCH_RESULT "
DEFAULT_OUT = os.path.join(HERE, "results", "gpu.json")
QUICK_OUT = os.path.join(HERE, "results", "quick", "gpu.json")

VGG11_CHANNELS = (64, 128, 256, 256, 512, 512, 512, 512)
POOL_AFTER = (2, 4, 6, 8)  # 1-based conv indices followed by a 2x2 pool (48 -> 24 -> 12 -> 6 -> 3)
IN_CHANNELS, CLASSES, SPIKE_PROB = 2, 10, 0.2
NEURON_SETTINGS = dict(decay_input=True, v_threshold=1.0, v_reset=None, detach_reset=True)  # + tau, Sigmoid

METHOD_LABELS = {
    "sj_bptt": "SJ BPTT", "sj_memopt": "SJ memopt", "sj_online": "SJ online SLTT",
    "sltt_c1": "SLTT chunk 1", "sltt_c2": "SLTT chunk 2", "sltt_c5": "SLTT chunk 5", "sltt_auto": "SLTT chunk auto",
    "sltt_k2": "SLTT-2", "sltt_fused": "zero-change fused SLTT",
    "sltt_c1_plain": "SLTT chunk 1, unpacked", "sltt_fused_plain": "zero-change fused SLTT, unpacked",
}
OK, OOM, NA, ERROR = "ok", "OOM", "n/a", "error"


class NotAvailable(Exception):
    """This SpikingJelly (or torch) lacks what a method needs: the cell reads "n/a" with the reason."""


# ---------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------
def scaled_channels(width: float) -> List[int]:
    """The eight conv widths at channel multiplier ``width`` (at least 1 each)."""
    return [max(1, int(round(c * width))) for c in VGG11_CHANNELS]


def build_vgg11(width: float, pool: str, tau: float, sltt_nodes: bool = False):
    """The VGG-11-like SNN, SpikingJelly layers, single-step (the caller sets the step mode).

    :param width: channel multiplier.
    :param pool: ``"avg"`` or ``"max"`` for the four 2x2 pools.
    :param sltt_nodes: SpikingJelly's ``SLTTLIFNode`` instead of ``LIFNode`` (same parameters, same order).
    :return: ``nn.Sequential``; multi-step it maps ``[T, B, 2, H, W]`` to ``[T, B, 10]`` (H, W >= 16).
    """
    import torch.nn as nn
    from spikingjelly.activation_based import layer, neuron, surrogate

    cls = neuron.SLTTLIFNode if sltt_nodes else neuron.LIFNode
    blocks: List[nn.Module] = []
    channels = IN_CHANNELS
    for index, out_channels in enumerate(scaled_channels(width), start=1):
        blocks += [layer.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                   layer.BatchNorm2d(out_channels),
                   cls(tau=tau, surrogate_function=surrogate.Sigmoid(), **NEURON_SETTINGS)]
        channels = out_channels
        if index in POOL_AFTER:
            blocks.append(layer.AvgPool2d(2) if pool == "avg" else layer.MaxPool2d(2))
    blocks += [layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(channels, CLASSES)]
    return nn.Sequential(*blocks)


# ---------------------------------------------------------------------------------------------------
# what SpikingJelly is running
# ---------------------------------------------------------------------------------------------------
def versions() -> Dict[str, Optional[str]]:
    """torch (and its CUDA), SpikingJelly, CuPy and Triton versions; None for what is not installed."""
    import importlib
    import importlib.metadata as metadata

    import torch

    found: Dict[str, Optional[str]] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                                       "python": sys.version.split()[0]}
    for key, dist in (("spikingjelly", "spikingjelly"), ("snn_localrules", "snn-localrules")):
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = None
    for key in ("cupy", "triton"):
        try:
            found[key] = importlib.import_module(key).__version__
        except Exception:  # ImportError, or a CuPy that cannot load its CUDA libraries
            found[key] = None
    return found


def sj_lif_implementation(device, model=None) -> Dict[str, Any]:
    """Which LIF implementation SpikingJelly used, found by feature inspection (call after a forward).

    SpikingJelly 2.x: ``functional.neuron_implementation("lif", device)`` names the kernel it bound
    (``cuda``, ``triton`` or ``torch``; ``torch-reference`` on CPU), ``_surrogate_spec`` says whether the
    surrogate has a fused form, and the selection's fallback records say why a call fell back to the torch
    reference. SpikingJelly 0.0.0.0.14: the neurons' ``backend`` attribute.
    """
    info: Dict[str, Any] = {"env_SJ_LIF_CUDA_IMPLEMENTATION": os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION"),
                            "device": str(device)}
    try:
        from spikingjelly.activation_based.functional import neuron as sj_fn
    except ImportError:
        sj_fn = None
    if sj_fn is not None and hasattr(sj_fn, "neuron_implementation"):
        try:
            info.update(sj_fn.neuron_implementation("lif", device))
        except Exception as exc:  # no CUDA implementation at all
            info["implementation"] = f"unknown ({type(exc).__name__}: {exc})"
        spec = getattr(sj_fn, "_surrogate_spec", None)
        if spec is not None:
            from spikingjelly.activation_based import surrogate

            info["fused_surrogate"] = spec(surrogate.Sigmoid()) is not None
        try:
            from spikingjelly._ops.lif import _selection

            info["fallbacks"] = sorted({str(key[1]) for key in getattr(_selection, "_selections", {})
                                        if isinstance(key, tuple) and len(key) == 2})
        except Exception:  # private layout of another release: leave it out
            pass
    if model is not None:
        backends = sorted({str(m.backend) for m in model.modules() if hasattr(m, "backend")
                           and hasattr(m, "v_threshold")})
        if backends:
            info["neuron_backend_attribute"] = backends  # SpikingJelly 0.0.0.0.14's backend= option
    if "implementation" not in info:
        info["implementation"] = (info.get("neuron_backend_attribute") or ["unknown"])[0]
    if info.get("fallbacks"):
        info["active"] = f"torch-reference (fallback: {'; '.join(info['fallbacks'])})"
    else:
        info["active"] = str(info["implementation"])
    return info


# ---------------------------------------------------------------------------------------------------
# profiling
# ---------------------------------------------------------------------------------------------------
_RUNTIME = re.compile(r"^cu(da)?[A-Z]")  # cudaLaunchKernel, cuLaunchKernel, cudaStreamSynchronize, ...


def summarize_profile(events: Sequence[Any], wall_s: float, cuda: bool) -> Dict[str, Any]:
    """Split ``wall_s`` of profiled batches into GPU kernel time and the host's op / launch / sync / Python time.

    :param events: ``torch.profiler.profile().events()`` (FunctionEvents, with the CPU event tree built).
    :param wall_s: wall time of the profiled batches, synchronized at both ends.
    :param cuda: whether CUDA activity was recorded.
    :return: seconds and shares of wall time: ``kernel`` (union of the GPU's kernel/copy intervals; runs
        beside the host, so not additive with the rest), and the host's additive split ``ops`` (self time
        of PyTorch ops and autograd nodes, all threads), ``launch`` (CUDA runtime/driver calls but
        synchronizations), ``sync`` (synchronize calls: the host waiting for the GPU) and ``python`` (the
        remainder: the interpreter, hooks, the optimizer's Python loop).
    """
    from torch.autograd import DeviceType

    device_intervals: List[Tuple[float, float]] = []
    ops_us = launch_us = sync_us = annotation_us = 0.0
    kernels = launches = 0
    for e in events:
        if getattr(e, "is_async", False):
            continue
        if e.device_type == DeviceType.CPU:
            self_us = float(e.self_cpu_time_total)
            if _RUNTIME.match(e.name):
                if "Synchronize" in e.name:
                    sync_us += self_us
                else:
                    launch_us += self_us
                    launches += "Launch" in e.name
            elif getattr(e, "is_user_annotation", False) or e.name.startswith(("Optimizer.", "ProfilerStep")):
                annotation_us += self_us  # record_function spans: their self time is Python's
            else:
                ops_us += self_us
        elif cuda and not getattr(e, "is_user_annotation", False):
            # GPU-side record_function spans (user annotations) cover whole regions, not GPU work: left out
            device_intervals.append((e.time_range.start, e.time_range.end))
            kernels += 1
    busy_us, end = 0.0, -math.inf
    for start, stop in sorted(device_intervals):  # union: concurrent streams are counted once
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    wall_us = wall_s * 1e6
    host_us = ops_us + launch_us + sync_us
    summary: Dict[str, Any] = {
        "wall_s": wall_s,
        "ops_s": ops_us / 1e6,
        "python_s": max(0.0, wall_us - host_us) / 1e6,
        "ops_share": ops_us / wall_us,
        "python_share": max(0.0, wall_us - host_us) / wall_us,
    }
    if cuda:
        summary.update(kernel_s=busy_us / 1e6, launch_s=launch_us / 1e6, sync_s=sync_us / 1e6,
                       kernel_share=busy_us / wall_us, launch_share=launch_us / wall_us,
                       sync_share=sync_us / wall_us, kernels=kernels, launches=launches)
    else:
        summary.update(kernel_s=None, launch_s=None, sync_s=None, kernel_share=None, launch_share=None,
                       sync_share=None, note="CPU: no kernels or launches; op time includes the computation")
    return summary


def profile_batches(train_batch: Callable[[], float], sync: Callable[[], None], cuda: bool,
                    batches: int = 1) -> Dict[str, Any]:
    """Run ``batches`` training batches under torch.profiler and :func:`summarize_profile` them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(batches):
            train_batch()
        sync()
        wall = time.perf_counter() - start
    summary = summarize_profile(prof.events(), wall, cuda)
    summary["batches"] = batches
    return summary


# ---------------------------------------------------------------------------------------------------
# one cell, in its own process
# ---------------------------------------------------------------------------------------------------
class count_fused_calls:
    """Counts calls of ``snn_localrules.functional.sltt_multistep.sltt_multi_step`` (the fused SLTT neuron)
    until :meth:`restore`, which puts the function back and returns the count."""

    def __init__(self):
        from snn_localrules.functional import sltt_multistep

        self.module, self.original, self.calls = sltt_multistep, sltt_multistep.sltt_multi_step, 0

        def counting(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        self.module.sltt_multi_step = counting

    def restore(self) -> int:
        self.module.sltt_multi_step = self.original
        return self.calls


def is_oom(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    text = str(exc).lower()
    return isinstance(exc, oom_types) or isinstance(exc, MemoryError) or "out of memory" in text \
        or "can't allocate memory" in text


def method_settings(method: str, args) -> Dict[str, Any]:
    """What a method runs with, as recorded in the JSON."""
    common = {"optimizer": "SGD(lr=0.01, momentum=0.9)", "loss": "mean over t and B of CE(out[t], y)"}
    if method == "sj_bptt":
        return {**common, "model": "LIFNode multi-step", "lif": "SpikingJelly default implementation"}
    if method == "sj_memopt":
        return {**common, "model": "LIFNode multi-step",
                "memopt": {"level": 1, "targets": ["layer.Conv2d", "neuron.LIFNode"],
                           "other options": "SpikingJelly defaults"}}
    if method == "sj_online":
        return {**common, "model": "SLTTLIFNode single-step",
                "driver": "learning.online_learning.ottt_online_training(online=False)",
                "loss": "CE(out[t], y) / T per step"}
    if method in ("sltt_fused", "sltt_fused_plain"):
        wrap = {"rule": "sltt", "fused": True, **(PLAIN if method == "sltt_fused_plain" else {})}
        return {**common, "wrap": wrap, "mode": "zero-change, the user's BPTT loop"}
    wrap: Dict[str, Any] = {"rule": "sltt", "optimizer": "SGD", "loss": "ce"}
    if method in SLTT_CHUNKS:
        wrap["chunk"] = SLTT_CHUNKS[method]
    elif method == "sltt_c1_plain":
        wrap.update(chunk=1, **PLAIN)
    elif method == "sltt_auto":
        wrap.update(chunk="auto", max_memory=parse_budget(args.auto_max_memory))
    elif method == "sltt_k2":
        # issue 8's SLTT-K on GPU: each run of forward-only steps as one no-grad multi-step call (the model's
        # batch norm then normalises such a run over its steps * B samples; the default follows chunk)
        # a worker knows its T; the run's header records the rule ("T") rather than one cell's number
        wrap.update(K=2, seed=args.seed, nograd_chunk=getattr(args, "T", None) or "T")
    if args.cuda_graphs:
        wrap["cuda_graphs"] = True
    return {"optimizer": common["optimizer"], "wrap": wrap, "mode": "online (learner.step)"}


def wrap_options(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword options of ``slr.wrap`` in a method's recorded settings: all of its ``wrap`` entry but
    the rule and the optimizer's name, which the worker passes itself."""
    return {k: v for k, v in settings["wrap"].items() if k not in ("rule", "optimizer")}


def parse_budget(text: str):
    """``--auto-max-memory``: ``"2GB"``/``"512MB"`` (bytes), ``"0.05"`` (a fraction of the device's memory)
    or a plain integer of bytes."""
    value = str(text).strip()
    units = {"GB": 1024 ** 3, "MB": 1024 ** 2}
    for suffix, factor in units.items():
        if value.upper().endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return float(value) if "." in value else int(value)


def run_worker(args) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    method, T, B = args.method, args.T, args.batch_size
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise NotAvailable("--device cuda but torch.cuda.is_available() is False")
    if args.pin_implementation:
        os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.pin_implementation

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # code imports and feature checks before the baseline: they are not training memory
    online_learning = None
    if method == "sj_memopt":
        try:
            from spikingjelly.activation_based import layer, memopt, neuron
            optimize_memory = memopt.optimize_memory
        except (ImportError, AttributeError) as exc:
            raise NotAvailable(f"spikingjelly.activation_based.memopt.optimize_memory is missing "
                               f"(SpikingJelly 2.x has it): {exc}")
    elif method == "sj_online":
        from spikingjelly.activation_based import neuron

        if not hasattr(neuron, "SLTTLIFNode"):
            raise NotAvailable("spikingjelly.activation_based.neuron.SLTTLIFNode is missing (SpikingJelly 2.x has it)")
        try:
            online_learning, _ = import_sj_online_learning()
            online_learning.ottt_online_training  # noqa: B018  (feature check)
        except (ImportError, AttributeError, FileNotFoundError) as exc:
            raise NotAvailable(f"SpikingJelly's ottt_online_training is missing: {exc}")
    elif method.startswith("sltt"):
        import snn_localrules as slr

        slr.plugin_manager()  # loads the adapter plugins: code, not training memory

    model = build_vgg11(args.width, args.pool, args.tau, sltt_nodes=(method == "sj_online"))
    if method != "sj_online":
        functional.set_step_mode(model, "m")
    model.to(device).train()
    optimizer = make_optimizer("sgd", model.parameters(), 0.01)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x_seq = (torch.rand(T, B, IN_CHANNELS, args.size, args.size, generator=generator) < SPIKE_PROB).float()
    y = torch.randint(0, CLASSES, (B,), generator=generator)
    x_seq, y = x_seq.to(device), y.to(device)
    y_flat = y.repeat(T)  # [T*B]: the user's loss as one call (mean over t of the per-step mean CE)

    gc.collect()
    sync()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        reserved_baseline = torch.cuda.memory_reserved(device)
    else:
        baseline = current_rss_bytes()

    result: Dict[str, Any] = {"method": method, "T": T, "batch_size": B, "device": str(device),
                              "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                              "memory_kind": "cuda_max_allocated" if cuda else "peak_rss",
                              "baseline_mb": baseline / MB, "settings": method_settings(method, args)}
    learner = None
    setup_start = time.perf_counter()
    if method in ("sj_bptt", "sj_memopt", "sltt_fused", "sltt_fused_plain"):
        if method == "sj_memopt":
            def example_forward(m):
                with torch.no_grad():  # level 1 probes shapes and binariness only
                    return m(x_seq)

            optimize_memory(model, (layer.Conv2d, neuron.LIFNode), example_forward, level=1)
            functional.reset_net(model)
        elif method.startswith("sltt_fused"):
            learner = slr.wrap(model, rule="sltt", **wrap_options(result["settings"]))

        def train_batch() -> float:  # the user's own BPTT loop
            optimizer.zero_grad(set_to_none=True)
            out = model(x_seq)  # [T, B, classes]
            loss = F.cross_entropy(out.flatten(0, 1), y_flat)
            loss.backward()
            optimizer.step()
            functional.reset_net(model)
            return float(loss.detach())

    elif method == "sj_online":
        x_bt = x_seq.transpose(0, 1)  # the driver wants [B, T, ...]
        y_bt = y.unsqueeze(1).expand(B, T)

        def loss_t(out_t, y_t):
            return F.cross_entropy(out_t, y_t) / T

        def train_batch() -> float:
            loss, _ = online_learning.ottt_online_training(model=model, optimizer=optimizer, x_seq=x_bt,
                                                           target_seq=y_bt, f_loss_t=loss_t, online=False)
            functional.reset_net(model)
            return float(loss.detach())

    else:
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, **wrap_options(result["settings"]))

        def train_batch() -> float:
            return learner.step(x_seq, y).loss

    result["setup_s"] = time.perf_counter() - setup_start

    fused_calls = count_fused_calls() if method.startswith("sltt") else None
    losses, times = [], []
    try:
        for index in range(args.warmup + args.timed):
            sync()
            start = time.perf_counter()
            losses.append(train_batch())
            sync()
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
            if fused_calls is not None and index == 0:
                # which neuron path the first batch took (this plugin fuses a multi-step call only where its
                # torch form is proven equal to SpikingJelly's on that device; else it steps the neuron)
                result["sltt_fused_neuron_calls_first_batch"] = fused_calls.restore()
                result["sltt_neuron_path"] = "fused multi-step" if result["sltt_fused_neuron_calls_first_batch"] \
                    else "stepped (no fused call seen)"
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            result["peak_reserved_growth_mb"] = (torch.cuda.max_memory_reserved(device) - reserved_baseline) / MB
        else:  # a process's peak RSS cannot be reset: in-process cells on CPU have no memory figure
            peak = None if getattr(args, "in_process", False) else peak_rss_bytes()
        result.update(status=OK, peak_growth_mb=None if peak is None else (peak - baseline) / MB, times_s=times,
                      s_per_batch=statistics.median(times), losses=losses, warmup=args.warmup, timed=args.timed)
        if getattr(learner, "chunk", None) == "auto":
            result["auto_chunk"] = min(learner.chunk_size, T)  # steps per backward in this run
        if getattr(learner, "graphs", None) is not None:
            result["cuda_graphs"] = {"captured": learner.graphs.captured, "off": learner.graphs.off}
        if args.profile:
            result["profile"] = profile_batches(train_batch, sync, cuda)
    except Exception as exc:
        if not is_oom(exc):
            raise
        peak_mb = (torch.cuda.max_memory_allocated(device) - baseline) / MB if cuda else None
        result.update(status=OOM, reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      peak_growth_mb=None, s_per_batch=None, peak_before_oom_mb=peak_mb)
    finally:  # also on an error: an --in-process run goes on to the next cell
        if fused_calls is not None:
            fused_calls.restore()
    if method in ("sj_bptt", "sj_memopt"):  # the methods that run SpikingJelly's multi-step LIF
        result["sj_lif"] = sj_lif_implementation(device, model)
    if learner is not None:
        learner.unwrap()
    result["versions"] = versions()
    return result


def cell_result(args) -> Dict[str, Any]:
    """:func:`run_worker`, with a failure turned into the cell's record instead of an exception."""
    try:
        result = run_worker(args)
    except NotAvailable as exc:
        result = {"status": NA, "reason": str(exc)}
    except Exception as exc:  # report, do not crash the table
        traceback.print_exc()
        status = OOM if is_oom(exc) else ERROR
        result = {"status": status, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result.update(method=args.method, T=args.T, batch_size=args.batch_size)
    result.setdefault("peak_growth_mb", None)
    result.setdefault("s_per_batch", None)
    return result


def worker_main(args) -> int:
    print(RESULT_TAG + json.dumps(cell_result(args)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------------
Key = Tuple[str, int, int]  # (method, T, B)


def run_cell(method: str, T: int, B: int, args) -> Dict[str, Any]:
    """One (method, T, B) cell in a fresh interpreter (on CPU with the mmap malloc threshold, so that the
    peak RSS follows live memory, as in memory_vs_T.py)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--T", str(T),
               "--batch-size", str(B), "--device", args.device, "--width", str(args.width), "--size",
               str(args.size), "--pool", args.pool, "--tau", str(args.tau), "--warmup", str(args.warmup),
               "--timed", str(args.timed), "--seed", str(args.seed), "--threads", str(args.threads),
               "--auto-max-memory", str(args.auto_max_memory)]
    if args.profile:
        command.append("--profile")
    if args.cuda_graphs:
        command.append("--cuda-graphs")
    if args.pin_implementation:
        command += ["--pin-implementation", args.pin_implementation]
    result = launch_worker(command, method, T, mmap=args.device == "cpu", idle_wait=args.idle_wait,
                           timeout=args.timeout, tag=RESULT_TAG)
    result.update(method=method, T=T, batch_size=B)
    if "status" not in result:  # launch_worker's own record: the worker died or timed out
        killed = "exited with -9" in result.get("error", "") or "exited with 137" in result.get("error", "")
        result.update(status=OOM if killed else ERROR, reason=result.pop("error", "worker failed"),
                      peak_growth_mb=None, s_per_batch=None)
    return result


def run_cell_here(method: str, T: int, B: int, args) -> Dict[str, Any]:
    """One cell in this process (``--in-process``): no interpreter start, CUDA context or kernel compilation
    per cell, which on a GPU cost more than the cell's batches. The CUDA peak is reset before each cell and
    taken above the memory allocated once its model and data are in place, so what earlier cells left in
    the caching allocator does not count; everything of the cell is freed before the next."""
    cell_args = argparse.Namespace(**vars(args))
    cell_args.method, cell_args.T, cell_args.batch_size = method, T, B
    try:
        return {**cell_result(cell_args), "in_process": True}
    finally:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fmt_mb(mb: Optional[float]) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.2f} GB" if abs(mb) >= 1024 else f"{mb:.0f} MB"


def _get(results: Dict[Key, Dict], method: str, T: int, B: int, key: str) -> Optional[float]:
    r = results.get((method, T, B))
    if not r or r.get("status") != OK:
        return None
    value = r.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b <= 0 else a / b


def cell_text(results: Dict[Key, Dict], method: str, T: int, B: int) -> str:
    r = results.get((method, T, B))
    if r is None:
        return "-"
    if r.get("status") != OK:
        reason = str(r.get("reason", "")).replace("|", "/")
        return r.get("status", ERROR) + (f" ({reason[:90]})" if reason and r.get("status") != OOM else "")
    mem, sec = r["peak_growth_mb"], r["s_per_batch"]
    text = f"{fmt_mb(mem)}, {sec:.3f} s"
    if method != "sj_bptt":
        rm = _ratio(mem, _get(results, "sj_bptt", T, B, "peak_growth_mb"))
        rt = _ratio(sec, _get(results, "sj_bptt", T, B, "s_per_batch"))
        if rm is not None and rt is not None:
            text += f" ({rm:.2f}x, {rt:.2f}x)"
    if r.get("auto_chunk") is not None:
        text += f" [c={r['auto_chunk']}]"
    return text


def markdown_table(results: Dict[Key, Dict], Ts: Sequence[int], batches: Sequence[int],
                   methods: Sequence[str]) -> str:
    """Rows: methods; columns: (T, B). Cells: ``memory, s/batch (memory ratio, time ratio to sj_bptt)``."""
    configs = [(T, B) for B in batches for T in Ts]
    lines = ["| method | " + " | ".join(f"T={T}, B={B}" for T, B in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for m in methods:
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cell_text(results, m, T, B)
                                                                    for T, B in configs) + " |")
    return "\n".join(lines)


def compute_checks(results: Dict[Key, Dict], Ts: Sequence[int], batches: Sequence[int]) -> List[Dict]:
    """The issue's targets, each ``{"name", "value", "target", "ok"}`` (``ok`` None: a cell is missing).

    Targets stated for B=32 apply to the smallest batch run and those for B=128 to the largest; a check
    on another batch size says which batch stands in.
    """
    small, large = min(batches), max(batches)
    checks: List[Dict] = []

    def label(B: int, meant: Optional[int]) -> str:
        return f"B={B}" if meant is None or B == meant else f"B={B} (stands in for B={meant})"

    def add(method: str, base: str, what: str, T: int, B: int, meant: Optional[int], target: float) -> None:
        key = "peak_growth_mb" if what == "memory" else "s_per_batch"
        value = _ratio(_get(results, method, T, B, key), _get(results, base, T, B, key))
        checks.append({"name": f"{method} / {base} {what}, T={T}, {label(B, meant)}", "value": value,
                       "target": f"<= {target:.2f}", "ok": None if value is None else bool(value <= target)})

    for B in batches:
        for T in Ts:
            if B == small:
                add("sltt_c1", "sj_bptt", "time", T, B, 32, 2.0)
            if B == large:
                add("sltt_c1", "sj_bptt", "time", T, B, 128, 1.0)
            add("sltt_c1", "sj_online", "memory", T, B, None, 0.75)
            add("sltt_c2", "sj_bptt", "time", T, B, None, 1.3)
            add("sltt_c2", "sj_bptt", "memory", T, B, None, 0.25)
            if B == large:
                add("sltt_k2", "sj_bptt", "time", T, B, 128, 0.5)
            add("sltt_fused", "sj_bptt", "time", T, B, None, 1.0)
            add("sltt_fused", "sj_bptt", "memory", T, B, None, 0.8)
    return checks


def format_checks(checks: List[Dict]) -> str:
    lines = []
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        verdict = "n/a" if c["ok"] is None else ("met" if c["ok"] else "missed")
        lines.append(f"- {c['name']}: {value}   target {c['target']}   {verdict}")
    return "\n".join(lines)


def profile_table(results: Dict[Key, Dict], keys: Sequence[Key]) -> str:
    """Per cell: the profiled batch's wall time and its shares (kernels | ops | launches | sync | Python)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines = ["| method | T | B | profiled s/batch | GPU kernels | host: ops | host: launches | host: sync | "
             "host: Python | kernels / launches per batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        p = (results.get(key) or {}).get("profile")
        if not p:
            continue
        m, T, B = key
        n = p["batches"]
        counts = "-" if p.get("kernels") is None else f"{p['kernels'] / n:.0f} / {p['launches'] / n:.0f}"
        lines.append(f"| {METHOD_LABELS.get(m, m)} | {T} | {B} | {p['wall_s'] / p['batches']:.3f} | "
                     f"{pct(p['kernel_share'])} | {pct(p['ops_share'])} | {pct(p['launch_share'])} | "
                     f"{pct(p['sync_share'])} | {pct(p['python_share'])} | {counts} |")
    return "\n".join(lines)


# the plot: two panels (memory, time) of grouped bars, one group per method, one bar per (T, B)
def try_plot(results: Dict[Key, Dict], Ts: Sequence[int], batches: Sequence[int], methods: Sequence[str],
             path: str, title: str, cuda: bool = True) -> str:
    """Peak memory and time per batch against the method, one bar per (T, B); missing cells are left out.

    :return: a one-line message saying where the plot went (or why there is none).
    """
    plt = plotting.pyplot()
    if plt is None:
        return plotting.NO_MATPLOTLIB
    configs = [(T, B) for B in batches for T in Ts]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(methods) + 2), 7.5), sharex=True)
    width = 0.8 / max(1, len(configs))
    memory_label = "peak CUDA memory allocated, growth (MB)" if cuda else "peak RSS growth, CPU (MB)"
    for axis, key, ylabel in ((axes[0], "peak_growth_mb", memory_label),
                              (axes[1], "s_per_batch", "time per batch (s)")):
        for j, (T, B) in enumerate(configs):
            xs, ys = [], []
            for i, m in enumerate(methods):
                v = _get(results, m, T, B, key)
                if v is not None and v > 0:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(v)
            axis.bar(xs, ys, width=width, label=f"T={T}, B={B}")
        axis.set_yscale("log")
        axis.set_ylabel(ylabel)
        axis.grid(True, axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(methods)))
    axes[1].set_xticklabels([METHOD_LABELS.get(m, m) for m in methods], rotation=25, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return plotting.save(fig, path)


def results_from_json(payload: Dict) -> Tuple[Dict[Key, Dict], List[int], List[int], List[str]]:
    results = {(r["method"], r["T"], r["batch_size"]): r for r in payload["results"]}
    c = payload["config"]
    return results, c["Ts"], c["batches"], c["methods"]


def plot_title(config: Dict) -> str:
    return (f"VGG-11-like SNN (width {config['width']}, {config['pool']} pools), {IN_CHANNELS}x{config['size']}x"
            f"{config['size']} input, {config.get('device_name') or config['device']}")


def plot_from_json(payload: Dict, path: str) -> str:
    config = payload["config"]
    return try_plot(*results_from_json(payload), path, plot_title(config), str(config["device"]).startswith("cuda"))


def fingerprint(config: Dict) -> Dict:
    """The settings a --resume'd cell must share with the current run."""
    keys = ("device", "width", "size", "pool", "tau", "seed", "warmup", "timed", "auto_max_memory", "profile",
            "pin_implementation", "cuda_graphs")
    return {k: config.get(k) for k in keys}


def parent_main(args) -> int:
    Ts, batches = list(args.Ts), list(args.batches)
    methods = list(args.methods)
    keys: List[Key] = [(m, T, B) for B in batches for T in Ts for m in methods]
    config = {"Ts": Ts, "batches": batches, "methods": methods, "device": args.device, "width": args.width,
              "size": args.size, "pool": args.pool, "tau": args.tau, "seed": args.seed, "warmup": args.warmup,
              "timed": args.timed, "threads": args.threads, "auto_max_memory": args.auto_max_memory,
              "profile": args.profile, "cuda_graphs": args.cuda_graphs, "pin_implementation": args.pin_implementation, "quick": args.quick,
              "in_process": args.in_process,
              "channels": scaled_channels(args.width), "pool_after_conv": list(POOL_AFTER),
              "input": [IN_CHANNELS, args.size, args.size], "classes": CLASSES, "spike_prob": SPIKE_PROB,
              "neuron": {"type": "spikingjelly LIFNode", "tau": args.tau, "surrogate": "Sigmoid", **NEURON_SETTINGS},
              "method_settings": {m: method_settings(m, args) for m in methods}}
    out = os.path.abspath(args.out)
    results: Dict[Key, Dict] = {}
    if args.resume and os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        if fingerprint(previous.get("config", {})) == fingerprint(config):
            for r in previous.get("results", []):
                key = (r["method"], r["T"], r["batch_size"])
                if key in keys and r.get("status") in (OK, OOM, NA):
                    results[key] = r
            print(f"--resume: {len(results)} of {len(keys)} cells taken from {out}")
        else:
            print(f"--resume: {out} was written with other settings; running every cell")

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    todo = [k for k in keys if k not in results]
    bar = tqdm(todo, desc="gpu bench", unit="cell") if tqdm is not None and todo else todo
    wall_start = time.perf_counter()
    for key in bar:
        method, T, B = key
        if tqdm is not None:
            bar.set_postfix_str(f"{method} T={T} B={B}")
        results[key] = (run_cell_here if args.in_process else run_cell)(method, T, B, args)
        line = f"{method:10s} T={T:3d} B={B:4d}: {cell_text(results, method, T, B)}"
        (tqdm.write if tqdm is not None else print)(line)
        # after every cell, so that a run stopped by a time limit loses nothing: --resume goes on from here
        plotting.write_json(out, {"config": config, "partial": True, "results": [results[k] for k in keys if k in results]})
    wall = time.perf_counter() - wall_start

    done = [results[k] for k in keys if results[k].get("status") == OK]
    config["device_name"] = done[0].get("device_name") if done else None
    config["versions"] = done[0].get("versions") if done else versions()
    sj_lif = next((r["sj_lif"] for r in done if r["method"] == "sj_bptt" and r.get("sj_lif")), None)
    config["sj_bptt_lif_implementation"] = sj_lif
    paths = sorted({f"{r['method']}: {r['sltt_neuron_path']}" for r in done if r.get("sltt_neuron_path")})
    config["sltt_neuron_paths"] = paths
    cuda = args.device.startswith("cuda")
    memory_kind = ("peak CUDA memory allocated above the pre-training baseline (torch.cuda.max_memory_allocated)"
                   if cuda else "peak RSS growth above the pre-training RSS (CPU)")
    table = markdown_table(results, Ts, batches, methods)
    checks = compute_checks(results, Ts, batches)

    print()
    print(f"Device: {config['device_name'] or args.device}; versions: "
          + ", ".join(f"{k} {v}" for k, v in config["versions"].items() if v))
    if sj_lif:
        print(f"SpikingJelly LIF implementation in sj_bptt: {sj_lif.get('active')} "
              f"(SJ_LIF_CUDA_IMPLEMENTATION={sj_lif.get('env_SJ_LIF_CUDA_IMPLEMENTATION') or 'unset (auto)'})")
    if paths:
        print("This plugin's LIF path: " + "; ".join(paths))
    print(f"Cells: memory = {memory_kind}; time = median s/batch over {args.timed} timed batch(es) after "
          f"{args.warmup} warm-up; (memory, time) as ratios to SJ BPTT of the same (T, B); [c=...]: the chunk "
          f"chunk='auto' chose. Width {args.width}, input {IN_CHANNELS}x{args.size}x{args.size}.")
    if not cuda:
        print("CPU run: a smoke test of the benchmark; its timings on a shared CPU are not GPU results.")
    print()
    print(table)
    print()
    print("Targets (ratios to SJ BPTT unless named otherwise):")
    print(format_checks(checks))
    profile_md = ""
    if args.profile:
        profile_md = profile_table(results, keys)
        print()
        print("Profile (one extra batch per cell under torch.profiler; shares of its wall time. GPU kernels run "
              "beside the host; the host columns add up to 100%: PyTorch op dispatch, CUDA runtime calls, "
              "synchronize waits, and the remainder, Python):" if cuda else
              "Profile (one extra batch per cell under torch.profiler; CPU: no kernels or launches to separate, "
              "'ops' includes the computation, 'Python' is the rest of the wall time):")
        print()
        print(profile_md)
    print(f"\nTotal wall time: {wall:.1f} s")

    plotting.write_json(out, {"config": config, "partial": False, "memory_kind": memory_kind,
                     "results": [results[k] for k in keys], "checks": checks, "table_markdown": table,
                     "profile_markdown": profile_md, "total_wall_s": wall})
    print(f"Results written to {out}")
    print(try_plot(results, Ts, batches, methods, os.path.splitext(out)[0] + ".png", plot_title(config), cuda))
    failed = [f"{m} T={T} B={B}" for (m, T, B), r in results.items() if r.get("status") == ERROR]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed and not args.allow_errors else 0


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--Ts", nargs="+", default=None, help="time steps, space- or comma-separated (10 20; --quick: 4)")
    p.add_argument("--batches", nargs="+", default=None, help="batch sizes, space- or comma-separated (32 128; "
                                                              "--quick: 4)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"subset of {' '.join(METHODS)}, space- or comma-separated (default all)")
    p.add_argument("--timed", type=int, default=None, help="timed batches per cell (10; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (2: the first compiles SpikingJelly's Triton kernels; --quick: 1)")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (1.0; --quick: 0.125)")
    p.add_argument("--size", type=int, default=None, help="input height and width (48; --quick: 16)")
    p.add_argument("--pool", choices=("avg", "max"), default="avg", help="the four 2x2 pools")
    p.add_argument("--tau", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each worker (2; --quick: 1, which on a busy 2-core machine is "
                        "many times faster than 2)")
    p.add_argument("--auto-max-memory", default="2GB",
                   help="sltt_auto's max_memory: bytes as '2GB'/'512MB'/an int, or a fraction like '0.05' of "
                        "the device's memory (default 2GB)")
    p.add_argument("--pin-implementation", default=None, choices=("cuda", "triton", "torch"),
                   help="set SJ_LIF_CUDA_IMPLEMENTATION in the workers (default: SpikingJelly's own choice)")
    p.add_argument("--profile", action="store_true",
                   help="one extra torch.profiler batch per cell: kernel / op / launch / sync / Python shares")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="online methods (sltt_c*, sltt_auto, sltt_k2) with cuda_graphs=True; write to another "
                        "--out to keep both runs")
    p.add_argument("--quick", action="store_true",
                   help="smoke size: T 4, B 4, width 0.125, 16x16 input, 1 timed batch, 1 thread; results/quick/")
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --quick: {QUICK_OUT})")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON at --out; run nothing")
    p.add_argument("--resume", action="store_true",
                   help="keep the cells of --out's JSON (same settings) and run only the missing ones")
    p.add_argument("--idle-wait", type=float, default=0.0,
                   help="wait up to this many seconds for idle CPUs before each worker (0: do not)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    p.add_argument("--in-process", action="store_true",
                   help="run every cell in this process instead of a fresh worker each: on CUDA the peak is "
                        "reset per cell, and the grid takes minutes less (interpreter, CUDA context and kernel "
                        "compilation once); on CPU cells then have no memory figure")
    p.add_argument("--allow-errors", action="store_true", help="exit 0 even if a cell failed (OOM and n/a never fail)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name in ("Ts", "batches", "methods"):  # "10 20", "10,20" and "10, 20" alike
        values = getattr(args, name)
        setattr(args, name, [v.strip() for value in values for v in value.split(",") if v.strip()] or None
                if values else None)
    try:
        args.Ts = [int(v) for v in args.Ts] if args.Ts else None
        args.batches = [int(v) for v in args.batches] if args.batches else None
    except ValueError as error:
        p.error(f"--Ts and --batches take whole numbers: {error}")
    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {' '.join(METHODS)}")
    args.Ts = args.Ts or list(QUICK_TS if quick else FULL_TS)
    args.batches = args.batches or list(QUICK_BATCHES if quick else FULL_BATCHES)
    args.methods = args.methods or list(METHODS)
    args.timed = args.timed if args.timed is not None else (1 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.threads = args.threads if args.threads is not None else (1 if quick else 2)
    args.width = args.width if args.width is not None else (QUICK_WIDTH if quick else 1.0)
    args.size = args.size if args.size is not None else (QUICK_SIZE if quick else 48)
    args.out = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    if not args.worker and not args.plot_only:
        args.device = args.device or default_device()
    if args.timed < 1 or args.warmup < 0:
        p.error("--timed must be >= 1 and --warmup >= 0")
    if args.size < 16:
        p.error("--size must be >= 16 (four 2x2 pools)")
    if args.width <= 0:
        p.error("--width must be positive")
    try:
        parse_budget(args.auto_max_memory)
    except ValueError:
        p.error(f"--auto-max-memory {args.auto_max_memory!r}: give e.g. 2GB, 512MB, 0.05 or bytes")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.method is None or args.T is None or args.batch_size is None or args.device is None:
            raise SystemExit("--worker needs --method, --T, --batch-size and --device")
        return worker_main(args)
    if args.plot_only:
        return plotting.plot_only(os.path.abspath(args.out), plot_from_json, "gpu")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
