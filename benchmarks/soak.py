"""Soak test: many batches of online SLTT and of TP on a small conv SNN, watching for leaks.

Each rule runs in a fresh process. The worker trains on fresh random event batches (as a data loader
gives new tensors each batch), calls ``predict`` every ``--predict-every`` batches and unwraps and wraps
the model again every ``--rewrap-every`` batches (hooks must come off and go on without piling up). At
batches 10, 30, 100, 300, 1000, 3000, ... and at the last batch, after ``gc.collect()``, it records:

* ``rss_mb``: resident set size now (``/proc/self/statm``), in a process whose allocator returns freed
  blocks to the OS (``MALLOC_MMAP_THRESHOLD_=131072``, as the memory benchmarks), so it follows live memory;
* ``gc_objects``: ``len(gc.get_objects())``; ``tensors``: live torch tensors among them;
* ``hooks``: forward/backward hooks on the model's modules plus per-instance ``forward`` overrides;
* ``wrapped``: how many models the wrap registry holds.

Growth between batch 100 (warm: allocator pools, optimizer state and autograd caches are in place)
and the end is flagged: RSS above ``--rss-tolerance-mb`` (default 4 MB), Python objects above
``--object-tolerance`` (default 200), and any growth at all in tensors, hooks or wrapped models.

    nice -n 10 python benchmarks/soak.py --minutes 3            # both rules, up to 3 min each
    python benchmarks/soak.py --rules sltt --batches 200         # quick look at one rule
    python benchmarks/soak.py --rules sltt --batches 400 --inject-leak 40 --out /tmp/x.json  # must flag

Prints a table and writes ``benchmarks/results/soak.json``; exits with status 1 when a leak is flagged.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts; this sits beside them)

DEFAULT_OUT = os.path.join(HERE, "results", "soak.json")
RESULT_TAG = "SOAK_RESULT "
MMAP_THRESHOLD = 128 * 1024
CHECKPOINTS = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
BASE_BATCH = 100  # growth is measured from here to the end


def current_rss_mb() -> float:
    """Resident set size now (second field of /proc/self/statm, in pages), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(num_classes: int = 10):
    """Conv(2->8)-BN-LIF-pool-Conv(8->16)-BN-LIF-pool-Linear readout, SpikingJelly multi-step, 16x16 input."""
    import torch.nn as nn
    from spikingjelly.activation_based import functional, layer, neuron

    model = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(tau=2.0, detach_reset=True),
        layer.MaxPool2d(2),
        layer.Conv2d(8, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.LIFNode(tau=2.0, detach_reset=True),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(16 * 4 * 4, num_classes),
    )
    functional.set_step_mode(model, "m")
    return model


def sample(model, batch: int, start: float) -> Dict:
    import torch

    from snn_localrules.wrap import _WRAPPED

    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
    hooks = sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        + ("forward" in vars(m))
        for m in model.modules()
    )
    row = {"batch": batch, "seconds": round(time.perf_counter() - start, 1), "rss_mb": round(current_rss_mb(), 2),
           "gc_objects": len(objects), "tensors": tensors, "hooks": hooks, "wrapped": len(_WRAPPED)}
    del objects
    return row


def worker(args) -> Dict:
    import torch

    import snn_localrules as slr

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)

    def wrap():
        if args.rule == "tp":
            return slr.wrap(model, rule="tp", optimizer=opt, num_classes=10, seed=args.seed)
        return slr.wrap(model, rule="sltt", optimizer=opt, loss="ce")

    def next_batch():
        x = (torch.rand(args.T, args.batch_size, 2, 16, 16, generator=gen) < 0.25).float()
        return x, torch.randint(0, 10, (args.batch_size,), generator=gen)

    learner = wrap()
    leaked: List = []  # --inject-leak: what a leak looks like to this benchmark
    rows: List[Dict] = []
    start = time.perf_counter()
    deadline = start + 60.0 * args.minutes if args.minutes else float("inf")
    batch = 0
    losses = []
    while batch < args.batches and time.perf_counter() < deadline:
        batch += 1
        x, y = next_batch()
        stats = learner.step(x, y)
        losses.append(stats.loss)
        if args.inject_leak:
            leaked.append(torch.ones(int(args.inject_leak * 1024 // 4)))
        if args.predict_every and batch % args.predict_every == 0:
            learner.predict(x)
        if args.rewrap_every and batch % args.rewrap_every == 0:
            learner.unwrap()
            learner = wrap()
        if batch in CHECKPOINTS:
            rows.append(sample(model, batch, start))
    if not rows or rows[-1]["batch"] != batch:
        rows.append(sample(model, batch, start))
    window = min(50, len(losses))
    return {"rule": args.rule, "batches": batch, "T": args.T, "batch_size": args.batch_size, "rows": rows,
            "first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window}


def flag_growth(result: Dict, rss_tolerance_mb: float, object_tolerance: int) -> List[str]:
    """What grew between batch ``BASE_BATCH`` and the last sample beyond the tolerances."""
    rows = result["rows"]
    base = next((r for r in rows if r["batch"] == BASE_BATCH), None)
    if base is None or rows[-1]["batch"] <= BASE_BATCH:
        return [f"ran {result['batches']} batches: too few to judge growth after batch {BASE_BATCH}"]
    end = rows[-1]
    flags = []
    if end["rss_mb"] - base["rss_mb"] > rss_tolerance_mb:
        flags.append(f"RSS grew {end['rss_mb'] - base['rss_mb']:.2f} MB (batch {BASE_BATCH} -> {end['batch']})")
    if end["gc_objects"] - base["gc_objects"] > object_tolerance:
        flags.append(f"Python objects grew by {end['gc_objects'] - base['gc_objects']}")
    for key in ("tensors", "hooks", "wrapped"):
        if end[key] > base[key]:
            flags.append(f"{key} grew from {base[key]} to {end[key]}")
    return flags


def table(result: Dict) -> str:
    header = ["batch", "s", "RSS MB", "gc objects", "tensors", "hooks", "wrapped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["batch"], r["seconds"], f"{r['rss_mb']:.2f}", r["gc_objects"], r["tensors"], r["hooks"], r["wrapped"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def run_rule(rule: str, args) -> Dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONHASHSEED="0")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--rule", rule, "--batches", str(args.batches),
               "--minutes", str(args.minutes), "--T", str(args.T), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--seed", str(args.seed), "--predict-every", str(args.predict_every),
               "--rewrap-every", str(args.rewrap_every), "--inject-leak", str(args.inject_leak)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"soak worker for {rule} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="sltt,tp", help="comma-separated: sltt (online), tp")
    parser.add_argument("--batches", type=int, default=100000, help="at most this many batches per rule")
    parser.add_argument("--minutes", type=float, default=3.0, help="at most this long per rule (0: no limit)")
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predict-every", type=int, default=50)
    parser.add_argument("--rewrap-every", type=int, default=250)
    parser.add_argument("--rss-tolerance-mb", type=float, default=4.0)
    parser.add_argument("--object-tolerance", type=int, default=200)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--inject-leak", type=float, default=0.0, metavar="KB",
                        help="keep this many KB per batch alive (checks that the detector flags a leak)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rule", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0

    results, leaked = {}, False
    for rule in [r.strip() for r in args.rules.split(",") if r.strip()]:
        result = run_rule(rule, args)
        result["flags"] = flag_growth(result, args.rss_tolerance_mb, args.object_tolerance)
        results[rule] = result
        leaked |= any("grew" in f for f in result["flags"])
        print(f"\n## {rule}: {result['batches']} batches (T={args.T}, B={args.batch_size}), "
              f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}")
        print(table(result))
        print("flags: " + ("; ".join(result["flags"]) if result["flags"] else "none (no growth after batch 100)"))
    import platform

    import torch

    payload = {"config": {k: getattr(args, k) for k in ("batches", "minutes", "T", "batch_size", "threads", "seed",
                                                         "predict_every", "rewrap_every", "rss_tolerance_mb",
                                                         "object_tolerance", "inject_leak")},
               "allocator": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}", "torch": torch.__version__,
               "python": platform.python_version(), "results": results}
    plotting.write_json(args.out, payload, indent=1)
    print(f"\nwrote {args.out}")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
