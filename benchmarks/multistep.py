"""Zero-change SLTT on a multi-step SpikingJelly model: fused neuron vs step by step vs BPTT vs online.

Four ways of training the same multi-step VGG-like SNN (the network of ``memory_vs_T.py``) on one batch:

* ``bptt``        -- plain SpikingJelly multi-step model, loss = mean_t CE(out[t], y), one backward.
* ``sltt_fused``  -- the same loop after ``slr.wrap(model, rule="sltt")`` (zero-change mode, ``fused=True``,
  the default): each multi-step neuron call is one fused node with SLTT's elementwise backward.
  Its spikes are kept for backward as 1-byte values by the layers after the neurons (``pack_spikes=True``,
  default), and a neuron fed by a batch norm keeps no membrane (``recompute_membrane=True``, default).
* ``sltt_fused_keepmem`` -- the same with ``recompute_membrane=False``: every fused neuron keeps its membrane.
* ``sltt_fused_nopack`` -- the fused neuron alone: ``pack_spikes=False, recompute_membrane=False``.
* ``sltt_steps``  -- the same with ``fused=False``: each neuron call runs step by step, state cut per step.
* ``sltt_online`` -- ``slr.wrap(model, rule="sltt", optimizer=opt)``; ``learner.step`` drives the time loop.

Zero-change modes change only the neurons' backward: the convolutions and batch norms still keep all T
steps of activations, so their memory follows BPTT's; the online driver holds one step.

Every (method, T) runs in fresh processes, measured as in ``memory_vs_T.py``: the baseline RSS is read
before wrapping and before any forward; peak growth is the peak RSS (VmHWM) minus it, from a worker whose malloc
returns large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``), and the time per batch (median) from a worker
with glibc's default malloc. On a shared CPU, times are indicative only.

``--neuron sltt`` (default): LIF tau=2, soft reset, ``detach_reset=True`` (the SLTT authors' setting).
``--neuron sj``: SpikingJelly's ``LIFNode`` defaults (hard reset to 0, ``detach_reset=False``), for which
SpikingJelly's BPTT keeps more per step.

``--device cuda``: the same on a GPU. Model and batch are on the GPU before the baseline (CUDA memory
allocated) is read; peak is ``torch.cuda.max_memory_allocated`` minus it, from the timing worker itself;
times are synchronised. ``bptt`` is then SpikingJelly's default CUDA LIF (its own selection: native CUDA,
else Triton), and ``bptt_torch`` its torch implementation (``SJ_LIF_CUDA_IMPLEMENTATION=torch``), the
"torch backend" of issue 5; SpikingJelly 2.x has no CuPy LIF (0.0.0.0.14's ``backend='cupy'`` neurons are
checked by ``tests/test_sj_legacy.py`` on the GPU). The fused SLTT neuron is used on CUDA only with
``SLR_FUSED_CUDA=1`` until its GPU tests pass (see ``adapters/spikingjelly.py``).

Usage::

    python benchmarks/multistep.py              # T in {4, 8, 16}, 3 timed batches
    python benchmarks/multistep.py --quick      # T in {4}, 1 timed batch (into results/quick/)
    SLR_FUSED_CUDA=1 python benchmarks/multistep.py --device cuda --batch-size 32 --Ts 10,20
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plotting  # noqa: E402
from memory_vs_T import (  # noqa: E402  (shared probes and network constants, one definition)
    CLASSES, CONTENDED, CONV_CHANNELS, HIDDEN, IN_CHANNELS, MB, SIZE, SPIKE_PROB, current_rss_bytes,
    launch_worker, make_optimizer, merge_time_and_memory, peak_rss_bytes, system_cpu_seconds,
)

METHODS = ("bptt", "sltt_fused", "sltt_fused_keepmem", "sltt_fused_nopack", "sltt_steps", "sltt_online")
#: on request (--methods), CUDA only: SpikingJelly's torch LIF implementation on the GPU
CUDA_METHODS = ("bptt_torch",)
FULL_TS = (4, 8, 16)
QUICK_TS = (4,)
RESULT_TAG = "MULTISTEP_RESULT "
DEFAULT_OUT = os.path.join(HERE, "results", "multistep.json")
QUICK_OUT = os.path.join(HERE, "results", "quick", "multistep.json")
NEURON_SETTINGS = {
    "sltt": dict(decay_input=True, v_threshold=1.0, v_reset=None, detach_reset=True),
    "sj": dict(decay_input=True, v_threshold=1.0, v_reset=0.0, detach_reset=False),
}


def build_model(neuron_setting: str, tau: float):
    """The VGG-like network of ``memory_vs_T.py`` (conv-BN-LIF blocks, pooling every second block, FC
    hidden layer, linear readout), multi-step, with the chosen LIF setting and a sigmoid surrogate."""
    import torch.nn as nn
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    def lif():
        return neuron.LIFNode(tau=tau, surrogate_function=surrogate.Sigmoid(), **NEURON_SETTINGS[neuron_setting])

    blocks: List[nn.Module] = []
    channels, size = IN_CHANNELS, SIZE
    for index, out_channels in enumerate(CONV_CHANNELS):
        blocks += [layer.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                   layer.BatchNorm2d(out_channels), lif()]
        channels = out_channels
        if index % 2 == 1:
            blocks.append(layer.AvgPool2d(2))
            size //= 2
    blocks += [layer.Flatten(), layer.Linear(channels * size * size, HIDDEN), lif(), layer.Linear(HIDDEN, CLASSES)]
    model = nn.Sequential(*blocks)
    functional.set_step_mode(model, "m")
    return model


def run_worker(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    import snn_localrules as slr

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    method, T, B = args.method, args.T, args.batch_size
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if method in CUDA_METHODS and not cuda:
        raise ValueError(f"{method} runs on CUDA only (--device cuda)")
    slr.plugin_manager()  # loads the adapter plugins: code, not training memory

    model = build_model(args.neuron, args.tau).to(device)
    model.train()
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x_seq = (torch.rand(T, B, IN_CHANNELS, SIZE, SIZE, generator=generator) < SPIKE_PROB).float().to(device)
    y = torch.randint(0, CLASSES, (B,), generator=generator).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    gc.collect()
    if cuda:  # model, optimizer (no state yet) and batch are on the GPU: the same baseline for every method
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss_bytes()  # before any wrapping or set-up forward
    learner = None
    if method == "sltt_online":
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, loss="ce")

        def train_batch():
            return learner.step(x_seq, y).loss
    else:
        if method in ("sltt_fused", "sltt_fused_keepmem", "sltt_fused_nopack", "sltt_steps"):
            learner = slr.wrap(model, rule="sltt", fused=(method != "sltt_steps"),
                               pack_spikes=method in ("sltt_fused", "sltt_fused_keepmem"),
                               recompute_membrane=(method == "sltt_fused"))

        def train_batch():  # the user's own BPTT loop, unchanged
            optimizer.zero_grad(set_to_none=True)
            out = model(x_seq)
            loss = sum(F.cross_entropy(out[t], y) for t in range(T)) / T
            loss.backward()
            optimizer.step()
            functional.reset_net(model)
            return float(loss.detach())

    losses, times, cpu_times = [], [], []
    system_start, own_start, wall_start = system_cpu_seconds(), time.process_time(), time.perf_counter()
    for index in range(args.warmup + args.batches):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_batch())
        sync()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    foreign = (system_cpu_seconds() - system_start) - (time.process_time() - own_start)
    foreign_share = max(0.0, foreign) / ((time.perf_counter() - wall_start) * (os.cpu_count() or 1))
    if learner is not None:
        learner.unwrap()
    return {
        "method": method, "T": T, "batch_size": B, "neuron": args.neuron, "threads": torch.get_num_threads(),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "memory_kind": "cuda_max_allocated" if cuda else "peak_rss",
        "sj_lif_cuda_implementation": os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION"),
        "slr_fused_cuda": os.environ.get("SLR_FUSED_CUDA"),
        "baseline_rss_mb": baseline / MB, "peak_growth_mb": (peak - baseline) / MB,
        "times_s": times, "s_per_batch": statistics.median(times), "losses": losses,
        # process CPU time (all threads): less sensitive than wall time to other processes' load
        "cpu_times_s": cpu_times, "cpu_s_per_batch": statistics.median(cpu_times),
        "foreign_cpu_share": foreign_share, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "error": None,
    }


def worker_main(args) -> int:
    try:
        result = run_worker(args)
    except Exception as exc:  # report, do not crash the table
        traceback.print_exc()
        result = {"method": args.method, "T": args.T, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def run_worker_process(method: str, T: int, args, mmap: bool, batches: int) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--T", str(T),
               "--batches", str(batches), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--seed", str(args.seed), "--optimizer", args.optimizer,
               "--lr", str(args.lr), "--tau", str(args.tau), "--neuron", args.neuron, "--device", args.device]
    previous = os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION")
    if method == "bptt_torch":  # read by SpikingJelly when the worker imports it
        os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = "torch"
    try:
        return launch_worker(command, method, T, mmap=mmap, idle_wait=args.idle_wait, timeout=args.timeout,
                             tag=RESULT_TAG)
    finally:
        if method == "bptt_torch":
            if previous is None:
                os.environ.pop("SJ_LIF_CUDA_IMPLEMENTATION", None)
            else:
                os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = previous


def run_config(method: str, T: int, args) -> Dict:
    """Time from a glibc-malloc worker, peak memory from an mmap-threshold worker (see memory_vs_T.py);
    on CUDA both from one worker (the CUDA allocator's peak does not depend on malloc)."""
    if args.device != "cpu":
        return run_worker_process(method, T, args, mmap=False, batches=args.batches)
    timed = run_worker_process(method, T, args, mmap=False, batches=args.batches)
    if timed.get("error"):
        return timed
    return merge_time_and_memory(timed, run_worker_process(method, T, args, mmap=True, batches=1))


def cell(result: Optional[Dict]) -> str:
    if result is None:
        return "-"
    if result.get("error"):
        return "ERROR: " + result["error"].replace("|", "/")[:120]
    mark = " (*)" if result.get("foreign_cpu_share", 0.0) > CONTENDED else ""
    return f"{result['peak_growth_mb']:.0f} MB, {result['s_per_batch']:.2f} s ({result['cpu_s_per_batch']:.2f} cpu-s){mark}"


def _ratio(results: Dict, a: str, b: str, T: int, key: str) -> Optional[float]:
    ra, rb = results.get((a, T)), results.get((b, T))
    if not ra or not rb or ra.get("error") or rb.get("error") or rb[key] <= 0:
        return None
    return ra[key] / rb[key]


def compute_checks(results: Dict, Ts) -> List[Dict]:
    checks = []
    for T in Ts:
        for name, a, b, key, target, ok in (
            ("sltt_fused / bptt memory", "sltt_fused", "bptt", "peak_growth_mb", "<= 0.80", lambda v: v <= 0.8),
            ("sltt_fused / bptt time", "sltt_fused", "bptt", "s_per_batch", "<= 1.00 (indicative)",
             lambda v: v <= 1.0),
            ("sltt_fused / bptt CPU time", "sltt_fused", "bptt", "cpu_s_per_batch", "<= 1.00 (indicative)",
             lambda v: v <= 1.0),
            ("sltt_fused / sltt_steps time", "sltt_fused", "sltt_steps", "s_per_batch", "(info)", None),
            ("sltt_online / bptt memory", "sltt_online", "bptt", "peak_growth_mb", "(info)", None),
            ("sltt_fused / bptt_torch memory", "sltt_fused", "bptt_torch", "peak_growth_mb", "(info)", None),
            ("sltt_fused / bptt_torch time", "sltt_fused", "bptt_torch", "s_per_batch", "(info)", None),
        ):
            value = _ratio(results, a, b, T, key)
            if value is None and "bptt_torch" in (a, b) and (b, T) not in results:
                continue  # a CUDA-only method that was not run
            checks.append({"name": f"{name}, T={T}", "value": value, "target": target,
                           "ok": None if value is None or ok is None else bool(ok(value))})
    return checks


def parent_main(args) -> int:
    Ts = QUICK_TS if args.quick else FULL_TS
    if args.Ts:
        Ts = tuple(int(t) for t in args.Ts.split(","))
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    configs = [(m, T) for T in Ts for m in methods]
    bar = tqdm(configs, desc="multistep", unit="cfg") if tqdm is not None else configs
    results: Dict = {}
    wall_start = time.perf_counter()
    for method, T in bar:
        results[(method, T)] = run_config(method, T, args)
        (tqdm.write if tqdm is not None else print)(f"{method:11s} T={T:2d}: {cell(results[(method, T)])}")
    wall = time.perf_counter() - wall_start

    lines = ["| T | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for T in Ts:
        lines.append(f"| {T} | " + " | ".join(cell(results.get((m, T))) for m in methods) + " |")
    table = "\n".join(lines)
    checks = compute_checks(results, Ts)
    print()
    if args.device == "cpu":
        measured = ("Peak memory growth over the pre-wrap RSS (mmap-threshold worker) and median wall and CPU time "
                    "per batch (glibc worker)")
    else:
        first = next((r for r in results.values() if not r.get("error")), {})
        measured = (f"Peak CUDA memory allocated over the pre-wrap baseline (model and batch on the GPU) and median "
                    f"synchronised wall time per batch, {first.get('device_name', args.device)}")
    print(f"{measured}; batch {args.batch_size}, input {IN_CHANNELS}x{SIZE}x{SIZE}, LIF setting '{args.neuron}', "
          f"{args.batches} timed batch(es), {args.threads} thread(s). Cells: 'MB, s/batch (CPU s/batch)'.")
    print()
    print(table)
    print()
    print(f"(*) other processes took more than {CONTENDED:.0%} of the CPUs during those batches.")
    print()
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        verdict = "" if c["ok"] is None else ("  OK" if c["ok"] else "  MISSED")
        print(f"- {c['name']}: {value}   target {c['target']}{verdict}")
    print(f"\nTotal wall time: {wall:.1f} s")

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    payload = {
        "config": {"Ts": list(Ts), "methods": list(methods), "batch_size": args.batch_size, "neuron": args.neuron,
                   "neuron_kwargs": NEURON_SETTINGS[args.neuron], "tau": args.tau, "batches": args.batches,
                   "warmup": args.warmup, "threads": args.threads, "optimizer": args.optimizer, "lr": args.lr,
                   "seed": args.seed, "quick": args.quick, "cpu_count": os.cpu_count(), "device": args.device,
                   "conv_channels": list(CONV_CHANNELS), "input": [IN_CHANNELS, SIZE, SIZE]},
        "results": [results[c] for c in configs],
        "checks": checks,
        "table_markdown": table,
        "total_wall_s": wall,
    }
    plotting.write_json(out, payload)
    print(f"Results written to {out}")
    failed = [f"{m} T={T}" for (m, T), r in results.items() if r.get("error")]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T=4 only and 1 timed batch")
    p.add_argument("--batches", type=int, default=None, help="timed batches per configuration (3; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--tau", type=float, default=2.0)
    p.add_argument("--neuron", choices=sorted(NEURON_SETTINGS), default="sltt",
                   help="sltt: soft reset, detach_reset (SLTT authors); sj: LIFNode defaults (hard reset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--Ts", nargs="+", default=None, help="T values, comma- or space-separated")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"comma- or space-separated subset of {','.join(METHODS)} (CUDA also {','.join(CUDA_METHODS)})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: CUDA memory and synchronised times)")
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default {DEFAULT_OUT}; with --quick {QUICK_OUT}, so that a smoke run "
                        "does not overwrite the full results)")
    p.add_argument("--idle-wait", type=float, default=10.0,
                   help="wait up to this many seconds for idle CPUs before each worker (0: do not wait)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS + CUDA_METHODS, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("Ts", "methods"):  # "10,20", "10 20" and "10, 20" alike
        values = [v.strip() for value in getattr(args, name) or () for v in value.split(",") if v.strip()]
        setattr(args, name, ",".join(values) or None)
    if args.batches is None:
        args.batches = 1 if args.quick else 3
    if args.methods and set(args.methods.split(",")) - set(METHODS + CUDA_METHODS):
        p.error(f"unknown method(s) in {args.methods!r}; choose from {', '.join(METHODS + CUDA_METHODS)}")
    if args.device == "cpu" and args.methods and set(args.methods.split(",")) & set(CUDA_METHODS):
        p.error(f"{', '.join(CUDA_METHODS)} run on CUDA only: add --device cuda")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.method is None or args.T is None:
            raise SystemExit("--worker needs --method and --T")
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
