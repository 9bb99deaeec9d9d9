"""Peak memory and time per batch against the number of time steps T.

Five ways of training the same VGG-like convolutional SNN (SpikingJelly LIF neurons) on one batch:

* ``bptt``      -- plain SpikingJelly multi-step model, loss = mean_t CE(out[t], y), one backward.
* ``sj_online`` -- SpikingJelly's own online SLTT: the same network built with ``neuron.SLTTLIFNode``
  (single-step) and driven by ``learning.online_learning.ottt_online_training`` (per-step forward and
  backward, gradients accumulated, one optimizer step per batch, ``online=False``).
* ``memopt``    -- SpikingJelly 2's ``memopt.optimize_memory`` (exact BPTT by gradient checkpointing),
  level 1, conv and neuron layers as targets, applied to the ``bptt`` model.
* ``sltt``      -- this package: ``slr.wrap(model, rule="sltt", optimizer=opt)`` on the ``bptt`` model.
* ``sltt_k2``   -- the same with ``K=2`` (SLTT-K).
* ``sltt_c2``, ``sltt_c4`` -- online SLTT with ``chunk=2`` / ``chunk=4`` (steps per forward and backward);
  not in the default set, ask for them with ``--methods``.

Every (method, T) runs in a fresh process (``--worker``), so peak memory is not polluted by earlier runs.
A worker builds the model, the optimizer and the data, reads its current RSS (the baseline) *before*
any wrapping or set-up forward, then runs one warm-up batch and N timed batches. Peak memory growth is
the peak RSS (VmHWM) at the end minus that baseline; the time is the median over the timed batches.

Usage::

    python benchmarks/memory_vs_T.py            # T in {2,4,8,16,32}, 3 timed batches
    python benchmarks/memory_vs_T.py --quick    # T in {2,8}, 1 timed batch (for tests), results/quick/
    python benchmarks/memory_vs_T.py --plot-only  # redraw results/memory_vs_T.png from the JSON
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts; this sits beside them)

METHODS = ("bptt", "sj_online", "memopt", "sltt", "sltt_k2")  # the default set
CHUNK_METHODS = {"sltt_c2": 2, "sltt_c4": 4}
ALL_METHODS = METHODS + tuple(CHUNK_METHODS)
FULL_TS = (2, 4, 8, 16, 32)
QUICK_TS = (2, 8)
MMAP_THRESHOLD = 128 * 1024  # bytes; with --malloc mmap every larger block is mmap'ed and unmapped on free
MALLOC_NOTE = {
    "both": "MB: peak RSS (VmHWM) growth in a worker with MALLOC_MMAP_THRESHOLD_=131072 (tracks live memory); "
            "s/batch: a separate worker with glibc's default malloc (fast path).",
    "mmap": "MB and s/batch from workers with MALLOC_MMAP_THRESHOLD_=131072 (times include page faults).",
    "glibc": "MB and s/batch from workers with glibc's default malloc (MB includes allocator retention).",
}
CONTENDED = 0.2  # a timing is flagged (*) when other processes took more than this share of the CPUs
RESULT_TAG = "MEMORY_VS_T_RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "memory_vs_T.json")
QUICK_OUT = os.path.join(HERE, "results", "quick", "memory_vs_T.json")

# network and data
CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256)
IN_CHANNELS, SIZE, CLASSES, HIDDEN = 2, 32, 10, 1024
SPIKE_PROB = 0.2


# ---------------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: VmHWM, the high-water mark of this process's own
    memory map. Not ``ru_maxrss``: Linux keeps that across ``exec``, so a worker started by a parent that
    was itself large would report the parent's peak (this hit the AMP worker of distributed_amp.py)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MB = 1024.0 * 1024.0


def system_cpu_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (/proc/stat, first line)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs are (0..1), sampled over ``seconds``."""
    start = system_cpu_seconds()
    time.sleep(seconds)
    return (system_cpu_seconds() - start) / (seconds * (os.cpu_count() or 1))


def wait_until_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait`` s) until other processes leave the CPUs mostly idle; return the
    busy fraction last seen. Timings on a small shared machine are otherwise dominated by other load."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_fraction(1.0)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy


# ---------------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------------
def build_model(sltt_nodes: bool, tau: float):
    """The VGG-like SNN. ``sltt_nodes``: SpikingJelly's single-step ``SLTTLIFNode`` instead of ``LIFNode``.

    Both variants have the same layers and parameters in the same order, so one seed gives the same
    initial weights. Neurons: LIF, decay_input=True, soft reset (v_reset=None), detach_reset=True,
    sigmoid surrogate.
    """
    import torch.nn as nn
    from spikingjelly.activation_based import layer, neuron, surrogate

    def lif():
        cls = neuron.SLTTLIFNode if sltt_nodes else neuron.LIFNode
        return cls(tau=tau, decay_input=True, v_threshold=1.0, v_reset=None,
                   surrogate_function=surrogate.Sigmoid(), detach_reset=True)

    blocks: List[nn.Module] = []
    channels = IN_CHANNELS
    size = SIZE
    for index, out_channels in enumerate(CONV_CHANNELS):
        blocks += [
            layer.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(out_channels),
            lif(),
        ]
        channels = out_channels
        if index % 2 == 1:  # a pooling after every second conv
            blocks.append(layer.AvgPool2d(2))
            size //= 2
    blocks += [
        layer.Flatten(),
        layer.Linear(channels * size * size, HIDDEN),
        lif(),
        layer.Linear(HIDDEN, CLASSES),
    ]
    return nn.Sequential(*blocks)


# ---------------------------------------------------------------------------------------------------
# one configuration, in its own process
# ---------------------------------------------------------------------------------------------------
def make_optimizer(name: str, params, lr: float):
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def import_sj_online_learning():
    """SpikingJelly's ``learning.online_learning`` module (home of ``ottt_online_training``).

    The ``learning`` package imports ``plasticity`` -> ``monitor`` -> ``torch.utils.tensorboard``, so
    without tensorboard installed the package import fails although ``online_learning.py`` itself needs
    nothing of it. In that case the module is loaded from its file, unchanged.
    """
    try:
        from spikingjelly.activation_based.learning import online_learning

        return online_learning, "spikingjelly ottt_online_training (online=False)"
    except ImportError as exc:
        import importlib.util

        import spikingjelly.activation_based as ab

        name = "spikingjelly.activation_based.learning.online_learning"
        path = os.path.join(os.path.dirname(ab.__file__), "learning", "online_learning.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "spikingjelly.activation_based.learning"
        spec.loader.exec_module(module)
        return module, (
            f"spikingjelly ottt_online_training (online=False), loaded from {path} because importing "
            f"spikingjelly.activation_based.learning failed: {type(exc).__name__}: {exc}"
        )


def run_worker(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    method, T, B = args.method, args.T, args.batch_size
    notes: List[str] = []

    # code imports are not training memory: do them before the baseline
    if method == "memopt":
        from spikingjelly.activation_based import layer, memopt, neuron
    elif method == "sj_online":
        online_learning, driver_note = import_sj_online_learning()
        notes.append(driver_note)
    elif method in ("sltt", "sltt_k2", *CHUNK_METHODS):
        import snn_localrules as slr

        slr.plugin_manager()  # loads the adapter plugins (entry points); touches no model

    model = build_model(sltt_nodes=(method == "sj_online"), tau=args.tau)
    if method != "sj_online":
        functional.set_step_mode(model, "m")
    model.train()
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x_seq = (torch.rand(T, B, IN_CHANNELS, SIZE, SIZE, generator=generator) < SPIKE_PROB).float()
    y = torch.randint(0, CLASSES, (B,), generator=generator)

    gc.collect()
    baseline = current_rss_bytes()  # before any wrapping or set-up forward
    maxrss_before = peak_rss_bytes()

    setup_start = time.perf_counter()
    learner = None
    if method in ("bptt", "memopt"):
        if method == "memopt":

            def example_forward(m):
                # level 1 only probes input sizes/binariness; no graph is needed for that
                with torch.no_grad():
                    return m(x_seq)

            memopt.optimize_memory(
                model, (layer.Conv2d, neuron.LIFNode), example_forward, level=1
            )
            functional.reset_net(model)

        def train_batch():
            optimizer.zero_grad(set_to_none=True)
            out = model(x_seq)  # [T, B, classes]
            loss = sum(F.cross_entropy(out[t], y) for t in range(T)) / T
            loss.backward()
            optimizer.step()
            functional.reset_net(model)
            return float(loss.detach())

    elif method == "sj_online":
        x_bt = x_seq.transpose(0, 1)  # the driver wants [B, T, ...] and transposes back itself
        y_bt = y.unsqueeze(1).expand(B, T)

        def loss_t(out_t, y_t):
            return F.cross_entropy(out_t, y_t) / T

        def train_batch():
            loss, _ = online_learning.ottt_online_training(
                model=model, optimizer=optimizer, x_seq=x_bt, target_seq=y_bt,
                f_loss_t=loss_t, online=False,
            )
            functional.reset_net(model)
            return float(loss.detach())

    elif method in ("sltt", "sltt_k2", *CHUNK_METHODS):
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, loss="ce",
                           K=2 if method == "sltt_k2" else None, seed=args.seed,
                           chunk=CHUNK_METHODS.get(method, 1),
                           **({} if args.nograd_chunk is None else {"nograd_chunk": args.nograd_chunk}))

        def train_batch():
            return learner.step(x_seq, y).loss

    else:
        raise ValueError(f"unknown method {method!r}")
    setup_s = time.perf_counter() - setup_start

    losses, times, cpu_times = [], [], []
    load_start = os.getloadavg()[0]
    system_start, own_start, wall_start = system_cpu_seconds(), time.process_time(), time.perf_counter()
    for index in range(args.warmup + args.batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_batch())
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if index >= args.warmup:  # the first batch(es) are the warm-up
            times.append(elapsed)
            cpu_times.append(cpu)
    peak = peak_rss_bytes()
    # CPU time other processes took while this worker ran its batches, as a share of all CPUs
    foreign = (system_cpu_seconds() - system_start) - (time.process_time() - own_start)
    foreign_share = max(0.0, foreign) / ((time.perf_counter() - wall_start) * (os.cpu_count() or 1))
    if learner is not None:
        learner.unwrap()

    return {
        "method": method,
        "T": T,
        "batch_size": B,
        "batches": args.batches,
        "threads": torch.get_num_threads(),
        "baseline_rss_mb": baseline / MB,
        "maxrss_before_mb": maxrss_before / MB,
        "maxrss_end_mb": peak / MB,
        "peak_growth_mb": (peak - baseline) / MB,
        "setup_s": setup_s,
        "times_s": times,
        "s_per_batch": statistics.median(times),
        "cpu_times_s": cpu_times,  # process CPU time (all threads): less sensitive to other load
        "cpu_s_per_batch": statistics.median(cpu_times),
        "losses": losses,
        "loadavg_1min": [load_start, os.getloadavg()[0]],
        "foreign_cpu_share": foreign_share,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "notes": notes,
        "error": None,
    }


def worker_main(args) -> int:
    try:
        result = run_worker(args)
        code = 0
    except Exception as exc:  # report, do not crash the table
        traceback.print_exc()
        result = {"method": args.method, "T": args.T, "error": f"{type(exc).__name__}: {exc}"}
        code = 0
    print(RESULT_TAG + json.dumps(result), flush=True)
    return code


# ---------------------------------------------------------------------------------------------------
# the parent: run every configuration, collect, report
# ---------------------------------------------------------------------------------------------------
def run_worker_process(method: str, T: int, args, malloc: str, batches: int) -> Dict:
    """Run one configuration in a fresh interpreter and return its JSON result."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--method", method, "--T", str(T),
        "--batches", str(batches), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
        "--threads", str(args.threads), "--seed", str(args.seed),
        "--optimizer", args.optimizer, "--lr", str(args.lr), "--tau", str(args.tau),
    ]
    if args.nograd_chunk is not None:
        command += ["--nograd-chunk", str(args.nograd_chunk)]
    return launch_worker(command, method, T, mmap=(malloc == "mmap"), idle_wait=args.idle_wait,
                         timeout=args.timeout, tag=RESULT_TAG)


def launch_worker(command: List[str], method: str, T: int, mmap: bool, idle_wait: float, timeout: float,
                  tag: str) -> Dict:
    """Run a worker command in a fresh interpreter (``mmap``: with the fixed mmap threshold, so that its
    peak RSS follows live memory) and return the JSON it printed after ``tag``, or an error record."""
    env = dict(os.environ)
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if idle_wait > 0:
        began = time.monotonic()
        wait_until_idle(idle_wait)
        waited = time.monotonic() - began
        if waited >= 2.0:  # (one probe takes a second)
            print(f"  (waited {waited:.0f} s for other processes to leave the CPUs; --idle-wait sets the most)",
                  file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "T": T, "error": f"worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(tag):
            result = json.loads(line[len(tag):])
            if result.get("error"):
                result["stderr_tail"] = proc.stderr[-2000:]
            return result
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"method": method, "T": T, "error": f"worker exited with {proc.returncode}: {tail}",
            "stderr_tail": proc.stderr[-2000:]}


def run_config(method: str, T: int, args) -> Dict:
    """One table cell. With ``--malloc both`` (default) two fresh workers: one under glibc's default
    malloc gives the time per batch (and a glibc peak RSS, kept as ``peak_growth_mb_glibc``), one under
    the fixed mmap threshold gives the peak memory (warm-up + 1 batch is enough there: the peak is
    reached in the first batches)."""
    if args.malloc != "both":
        result = run_worker_process(method, T, args, args.malloc, args.batches)
        result["memory_malloc"] = result["time_malloc"] = args.malloc
        return result
    timed = run_worker_process(method, T, args, "glibc", args.batches)
    if timed.get("error"):
        return timed
    memory = run_worker_process(method, T, args, "mmap", 1)
    return merge_time_and_memory(timed, memory)


def merge_time_and_memory(timed: Dict, memory: Dict) -> Dict:
    """One table cell from a glibc-malloc timing worker and an mmap-threshold memory worker: times from
    the first, peak memory from the second (the first's, allocator retention included, kept beside it)."""
    if memory.get("error"):
        return memory
    result = dict(timed)
    result["peak_growth_mb_glibc"] = timed["peak_growth_mb"]
    result["peak_growth_mb"] = memory["peak_growth_mb"]
    result["memory_worker"] = memory
    result["memory_malloc"], result["time_malloc"] = "mmap", "glibc"
    return result


def cell(result: Optional[Dict]) -> str:
    if result is None:
        return "-"
    if result.get("error"):
        return "ERROR: " + result["error"].replace("|", "/")[:120]
    mark = " (*)" if result.get("foreign_cpu_share", 0.0) > CONTENDED else ""
    return f"{result['peak_growth_mb']:.0f} MB, {result['s_per_batch']:.2f} s{mark}"


def markdown_table(results: Dict, Ts, methods) -> str:
    lines = ["| T | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for T in Ts:
        lines.append(f"| {T} | " + " | ".join(cell(results.get((m, T))) for m in methods) + " |")
    return "\n".join(lines)


def _value(results, method, T, key) -> Optional[float]:
    r = results.get((method, T))
    if r is None or r.get("error"):
        return None
    return r[key]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def compute_ratios(results: Dict, Ts) -> List[Dict]:
    """The target checks, each as a dict (name, value, target, ok). With --quick the largest T run
    stands in for T=32/T=16."""
    t_min, t_max = min(Ts), max(Ts)
    t_mid = 16 if 16 in Ts else t_max
    mem = lambda m, T: _value(results, m, T, "peak_growth_mb")  # noqa: E731
    sec = lambda m, T: _value(results, m, T, "s_per_batch")  # noqa: E731
    checks = []

    def add(name, value, target, ok_fn):
        checks.append({"name": name, "value": value, "target": target,
                       "ok": None if value is None else bool(ok_fn(value))})

    add(f"sltt memory T={t_max} / T={t_min}", _ratio(mem("sltt", t_max), mem("sltt", t_min)),
        "within 10% (<= 1.10)", lambda v: v <= 1.10)
    for T in Ts:
        add(f"sltt / sj_online memory, T={T}", _ratio(mem("sltt", T), mem("sj_online", T)),
            "no worse (<= 1.00)", lambda v: v <= 1.0)
    for T in Ts:
        add(f"sltt / sj_online time, T={T}", _ratio(sec("sltt", T), sec("sj_online", T)),
            "no worse (<= 1.00)", lambda v: v <= 1.0)
    add(f"sltt / memopt memory, T={t_max}", _ratio(mem("sltt", t_max), mem("memopt", t_max)),
        "<= 0.25", lambda v: v <= 0.25)
    add(f"sltt_k2 / bptt time, T={t_mid}", _ratio(sec("sltt_k2", t_mid), sec("bptt", t_mid)),
        "<= 0.50 (aim 0.33)", lambda v: v <= 0.50)
    # context, no target
    add(f"sltt / bptt memory, T={t_max}", _ratio(mem("sltt", t_max), mem("bptt", t_max)), "(info)",
        lambda v: True)
    add(f"memopt / bptt memory, T={t_max}", _ratio(mem("memopt", t_max), mem("bptt", t_max)), "(info)",
        lambda v: True)
    add(f"sltt / bptt time, T={t_mid}", _ratio(sec("sltt", t_mid), sec("bptt", t_mid)), "(info)",
        lambda v: True)
    glibc = lambda m, T: _value(results, m, T, "peak_growth_mb_glibc") if results.get((m, T), {}).get(  # noqa: E731
        "peak_growth_mb_glibc") is not None else None
    if glibc("sltt", t_max) is not None:
        add(f"[glibc malloc] sltt memory T={t_max} / T={t_min}", _ratio(glibc("sltt", t_max), glibc("sltt", t_min)),
            "(info)", lambda v: True)
        add(f"[glibc malloc] sltt / sj_online memory, T={t_max}",
            _ratio(glibc("sltt", t_max), glibc("sj_online", t_max)), "(info)", lambda v: True)
        add(f"[glibc malloc] sltt / memopt memory, T={t_max}",
            _ratio(glibc("sltt", t_max), glibc("memopt", t_max)), "(info)", lambda v: True)
    return checks


def format_ratios(checks: List[Dict], verdicts: bool = True) -> str:
    """One line per ratio; ``verdicts=False`` (a --quick run: too few steps and batches for the targets,
    which are stated for the full run) gives the values without OK/MISSED."""
    lines = []
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        verdict = "" if c["target"] == "(info)" or not verdicts else (
            "  n/a" if c["ok"] is None else ("  OK" if c["ok"] else "  MISSED"))
        lines.append(f"- {c['name']}: {value}   target {c['target']}{verdict}")
    return "\n".join(lines)


METHOD_LABELS = {
    "bptt": "BPTT",
    "sj_online": "SpikingJelly online SLTT",
    "memopt": "SpikingJelly memopt (checkpointing)",
    "sltt": "SLTT (ours, online)",
    "sltt_k2": "SLTT-2 (ours, online)",
    "sltt_c2": "SLTT chunk 2 (ours, online)",
    "sltt_c4": "SLTT chunk 4 (ours, online)",
}
# the baselines dashed and drawn on top (SpikingJelly's online SLTT lies on ours in the memory panel),
# this plugin's rules solid and thicker underneath
METHOD_STYLES = {
    "bptt": dict(color="black", linestyle="--", marker="s", zorder=3),
    "sj_online": dict(color="tab:orange", linestyle="--", marker="^", zorder=3),
    "memopt": dict(color="tab:purple", linestyle="--", marker="v", zorder=3),
    "sltt": dict(color="tab:blue", linestyle="-", marker="o", linewidth=2.2),
    # drawn over SLTT's line where their memory is the same: dashed and hollow, so SLTT's shows through
    "sltt_k2": dict(color="tab:green", linestyle=(0, (4, 2)), marker="o", markerfacecolor="none", linewidth=2.2),
    "sltt_c2": dict(color="tab:cyan", linestyle="-", marker="d", linewidth=1.6),
    "sltt_c4": dict(color="tab:olive", linestyle="-", marker="d", linewidth=1.6),
}


def try_plot(results: Dict, Ts, methods, path: str) -> str:
    """Two panels against T: peak memory growth and median time per batch, one line per method.

    :param results: ``{(method, T): worker result}`` as collected by :func:`parent_main` (or
        :func:`results_from_json`); cells with an error are left out of the lines.
    :return: a one-line message saying where the plot went (or why there is none).
    """
    plt = plotting.pyplot()
    if plt is None:
        return plotting.NO_MATPLOTLIB
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        style = METHOD_STYLES.get(m, dict(marker="o"))
        for ax, key in ((ax_mem, "peak_growth_mb"), (ax_time, "s_per_batch")):
            points = [(T, _value(results, m, T, key)) for T in Ts]
            points = [(T, v) for T, v in points if v is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=METHOD_LABELS.get(m, m), **style)
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(Ts))
        ax.set_xticklabels([str(T) for T in Ts])
        ax.set_xlabel("time steps T")
        ax.grid(True, alpha=0.3)
    ax_mem.set_ylabel("peak memory growth (MB)")
    ax_mem.set_title("Peak memory vs T")
    ax_time.set_ylabel("median time per batch (s)")
    ax_time.set_title("Time per batch vs T")
    ax_mem.legend(fontsize=8)
    fig.suptitle("VGG-like SpikingJelly SNN (7 conv + 2 FC, LIF), batch 8, 2x32x32 input, CPU", fontsize=10)
    return plotting.save(fig, path)


def results_from_json(payload: Dict):
    """``(results, Ts, methods)`` from a JSON file written by :func:`parent_main`, for :func:`try_plot`."""
    results = {(r["method"], r["T"]): r for r in payload["results"]}
    return results, payload["config"]["Ts"], payload["config"]["methods"]


def plot_from_json(payload: Dict, path: str) -> str:
    """:func:`try_plot` from a JSON file written by :func:`parent_main`."""
    return try_plot(*results_from_json(payload), path)


def parent_main(args) -> int:
    Ts = QUICK_TS if args.quick else FULL_TS
    if args.Ts:
        Ts = tuple(int(t) for t in args.Ts.split(","))
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    configs = [(m, T) for T in Ts for m in methods]

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    wall_start = time.perf_counter()
    results: Dict = {}
    bar = tqdm(configs, desc="memory_vs_T", unit="cfg") if tqdm is not None else configs
    for method, T in bar:
        if tqdm is not None:
            bar.set_postfix_str(f"{method} T={T}")
        results[(method, T)] = run_config(method, T, args)
        line = f"{method:9s} T={T:2d}: {cell(results[(method, T)])}"
        (tqdm.write if tqdm is not None else print)(line)
    wall = time.perf_counter() - wall_start

    table = markdown_table(results, Ts, methods)
    glibc_lines = []
    if any(r.get("peak_growth_mb_glibc") is not None for r in results.values()):
        glibc_lines = ["| T | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for T in Ts:
            row = []
            for m in methods:
                v = (results.get((m, T)) or {}).get("peak_growth_mb_glibc")
                row.append("-" if v is None else f"{v:.0f} MB")
            glibc_lines.append(f"| {T} | " + " | ".join(row) + " |")
    checks = compute_ratios(results, Ts)
    print()
    print(f"Peak memory growth over the pre-training RSS and median time per batch "
          f"(batch {args.batch_size}, input {IN_CHANNELS}x{SIZE}x{SIZE}, {args.batches} timed batch(es), "
          f"{args.threads} thread(s), cells: 'MB, s/batch')")
    print()
    print(table)
    print()
    print(f"(*) other processes took more than {CONTENDED:.0%} of the CPUs during that configuration's "
          "batches: its time is inflated.")
    print(MALLOC_NOTE[args.malloc])
    if glibc_lines:
        print()
        print("Peak memory growth of the timing workers (glibc default malloc, includes allocator retention):")
        print()
        print("\n".join(glibc_lines))
    print()
    print("Ratios:" + (" (a --quick run: the targets are for the full run, T up to 32; no verdicts)"
                       if args.quick else ""))
    print(format_ratios(checks, verdicts=not args.quick))
    print()
    print(f"Total wall time: {wall:.1f} s")

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    payload = {
        "config": {
            "Ts": list(Ts), "methods": list(methods), "batch_size": args.batch_size,
            "batches": args.batches, "threads": args.threads, "optimizer": args.optimizer,
            "lr": args.lr, "tau": args.tau, "seed": args.seed, "quick": args.quick,
            "warmup": args.warmup, "malloc": args.malloc, "cpu_count": os.cpu_count(),
            "conv_channels": list(CONV_CHANNELS), "input": [IN_CHANNELS, SIZE, SIZE],
            "python": sys.version.split()[0],
        },
        "results": [results[c] for c in configs],
        "ratios": checks,
        "table_markdown": table,
        "table_glibc_memory_markdown": "\n".join(glibc_lines),
        "total_wall_s": wall,
    }
    plotting.write_json(out, payload)
    print(f"Results written to {out}")
    print(try_plot(results, Ts, methods, os.path.splitext(out)[0] + ".png"))
    # memopt is allowed to fail (its error is then the table entry); the others are not
    failed = [f"{m} T={T}" for (m, T), r in results.items() if r.get("error") and m != "memopt"]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed and not args.allow_errors else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {2, 8} and 1 timed batch")
    p.add_argument("--batches", type=int, default=None, help="timed batches per configuration (3; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per configuration")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--tau", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nograd-chunk", type=int, default=None,
                   help="SLTT-K's nograd_chunk option (default: the library's default)")
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default {DEFAULT_OUT}; with --quick {QUICK_OUT}, so that a smoke "
                        "run does not overwrite the full results); the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNG from the existing JSON at --out; runs nothing")
    p.add_argument("--Ts", nargs="+", default=None,
                   help="T values, comma- or space-separated (overrides the default set)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"comma- or space-separated subset of {','.join(ALL_METHODS)} (default {','.join(METHODS)})")
    p.add_argument("--malloc", choices=("both", "mmap", "glibc"), default="both",
                   help="mmap: workers run with MALLOC_MMAP_THRESHOLD_=131072, so every tensor block over "
                        "128 KiB is returned to the OS when freed and the peak RSS follows the live memory (but "
                        "the page faults slow every method 2-3x); glibc: glibc's adaptive default, fast, "
                        "but freed blocks stay in the heap so the peak RSS also counts allocator "
                        "retention/fragmentation; both (default): memory from an mmap worker, time from a "
                        "glibc worker")
    p.add_argument("--idle-wait", type=float, default=30.0,
                   help="before each configuration wait up to this many seconds for the CPUs to be idle "
                        "(0: do not wait)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even if a configuration failed (its error is in the table)")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=ALL_METHODS, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("Ts", "methods"):  # "2,4 8", "2, 4, 8" -> "2,4,8"
        values = [v.strip() for value in getattr(args, name) or () for v in value.split(",") if v.strip()]
        setattr(args, name, ",".join(values) or None)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.batches is None:
        args.batches = 1 if args.quick else 3
    if args.batches < 1:
        p.error("--batches must be >= 1")
    if args.methods:
        unknown = set(args.methods.split(",")) - set(ALL_METHODS)
        if unknown:
            p.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.method is None or args.T is None:
            raise SystemExit("--worker needs --method and --T")
        return worker_main(args)
    if args.plot_only:
        return plotting.plot_only(os.path.abspath(args.out), plot_from_json, "memory")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
