"""TP's label path: one 2B batch (label_batch="concat") vs two calls of B (label_batch="separate").

Time: one process alternates the two modes batch by batch on the same model and data (so machine load
hits both alike) and reports the median time per batch of each and their ratio. Memory: each mode in a
fresh process, growth of peak RSS over a baseline taken before wrapping.

    python benchmarks/tp_label_batch.py                     # MLP 2312-200-10 and VGG-9 width 0.125
    python benchmarks/tp_label_batch.py --repeats 20 --models mlp
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts; this sits beside them)

TAG = "LABEL_BATCH_RESULT "
MB = 1024.0 * 1024.0


def build(name: str):
    import snn_localrules as slr

    if name == "mlp":
        return slr.presets.mlp_nmnist()
    return slr.presets.vgg9(in_channels=2, num_classes=10, input_size=34, width=0.125,
                            neuron_kwargs={"v_threshold": 0.5})


def batches(args):
    from snn_localrules.data import load_nmnist5k_events

    (x, y), _ = load_nmnist5k_events(T=args.T, seed=0)
    return [(x[i : i + args.batch_size].transpose(0, 1), y[i : i + args.batch_size])
            for i in range(0, args.batch_size * (args.repeats + 1), args.batch_size)]


def time_worker(args) -> dict:
    import torch

    import snn_localrules as slr

    torch.set_num_threads(args.threads)
    data = batches(args)
    learners = {}
    for mode in ("concat", "separate"):
        torch.manual_seed(0)
        model = build(args.model)
        learners[mode] = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), 1e-3),
                                  num_classes=10, label_batch=mode)
        learners[mode].step(*data[0])  # warm-up: layer order, projection, allocator
    times = {"concat": [], "separate": []}
    for r, batch in enumerate(data[1:]):
        order = ("concat", "separate") if r % 2 == 0 else ("separate", "concat")
        for mode in order:
            start = time.perf_counter()
            learners[mode].step(*batch)
            times[mode].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"model": args.model, "median_s": med, "ratio_separate_over_concat": med["separate"] / med["concat"],
            "repeats": args.repeats, "batch_size": args.batch_size, "T": args.T}


def memory_worker(args) -> dict:
    import torch

    import snn_localrules as slr

    torch.set_num_threads(args.threads)
    data = batches(args)[:3]
    torch.manual_seed(0)
    model = build(args.model)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=10, label_batch=args.mode)
    for batch in data:
        learner.step(*batch)
    from memory_vs_T import peak_rss_bytes  # VmHWM: not polluted by a large parent's peak

    peak = peak_rss_bytes()
    return {"model": args.model, "mode": args.mode, "peak_growth_mb": (peak - baseline) / MB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "vgg9"], choices=["mlp", "vgg9"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "tp_label_batch.json"))
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = time_worker(args) if args.worker == "time" else memory_worker(args)
        print(TAG + json.dumps(result), flush=True)
        return 0
    results = []
    common = ["--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--T", str(args.T),
              "--threads", str(args.threads)]
    for model in args.models:
        runs = [["--worker", "time", "--model", model]]
        runs += [["--worker", "memory", "--model", model, "--mode", mode] for mode in ("concat", "separate")]
        for extra in runs:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *extra, *common],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith(TAG)]
            result = json.loads(lines[-1][len(TAG):]) if lines else {"error": done.stderr.strip()[-500:]}
            print(json.dumps(result))
            results.append(result)
    plotting.write_json(args.out, {"args": vars(args), "results": results})
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
