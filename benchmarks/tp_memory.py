"""Peak memory of Traces Propagation against T and against the number of classes, BPTT beside it.

TP keeps one trace per neuron and a label projection S (O x input), so its memory should not grow with
T, and should grow with the number of classes O only through S. Each configuration runs in a fresh
process with ``MALLOC_MMAP_THRESHOLD_=131072`` so that the peak RSS follows live memory (freed tensor
blocks go back to the OS); peak growth is measured from a baseline taken before any wrapping or forward.
Model: the VGG-9 preset at reduced width on 2x32x32 event-like input (SpikingJelly, multi-step).

    python benchmarks/tp_memory.py            # T in {2, 8, 32} (10 classes) and 10 vs 100 classes (T=8)
    python benchmarks/tp_memory.py --quick    # T in {2, 8}, 10 vs 100 classes at T=2, results/quick/
    python benchmarks/tp_memory.py --plot-only  # redraw results/tp_memory.png from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plotting  # noqa: E402
from memory_vs_T import MB, MMAP_THRESHOLD, current_rss_bytes, peak_rss_bytes  # noqa: E402

RESULT_TAG = "TP_MEMORY_RESULT "
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp_memory.json")
QUICK_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quick", "tp_memory.json")


def worker(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    import snn_localrules as slr

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = slr.presets.vgg9(in_channels=2, num_classes=args.classes, input_size=32, width=args.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    x_seq = (torch.rand(args.T, args.batch_size, 2, 32, 32, generator=gen) < 0.2).float()
    y = torch.randint(0, args.classes, (args.batch_size,), generator=gen)
    slr.plugin_manager()
    baseline = current_rss_bytes()
    start = time.perf_counter()
    if args.method == "tp":
        learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=args.classes, seed=args.seed)
        for _ in range(args.batches):
            learner.step(x_seq, y)
        learner.unwrap()
    else:
        for _ in range(args.batches):
            opt.zero_grad(set_to_none=True)
            out = model(x_seq)
            sum(F.cross_entropy(out[t], y) for t in range(args.T)).div(args.T).backward()
            opt.step()
            functional.reset_net(model)
    return {"method": args.method, "T": args.T, "classes": args.classes,
            "peak_growth_mb": (peak_rss_bytes() - baseline) / MB,
            "s_per_batch": (time.perf_counter() - start) / args.batches}


def run(method: str, T: int, classes: int, args) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--T", str(T),
           "--classes", str(classes), "--batches", str(args.batches), "--batch-size", str(args.batch_size),
           "--width", str(args.width), "--threads", str(args.threads), "--seed", str(args.seed)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"method": method, "T": T, "classes": classes, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def plot(payload: Dict, path: str) -> str:
    """From a JSON written by :func:`main`: peak memory growth (left) and time per batch (right) against T
    for TP and BPTT at 10 classes, and the 100-class runs as hollow markers at their T.

    :return: a one-line message saying where the plot went (or why there is none).
    """
    plt = plotting.pyplot()
    if plt is None:
        return plotting.NO_MATPLOTLIB
    ok = [r for r in payload["results"] if "error" not in r]
    if not ok:
        return "no successful configuration in the JSON: plot skipped."
    styles = {"tp": dict(color="tab:red", marker="o", linewidth=2.2, label="TP (ours)"),
              "bptt": dict(color="black", marker="s", linestyle="--", label="BPTT")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    Ts = sorted({r["T"] for r in ok})
    for ax, key, ylabel in ((axes[0], "peak_growth_mb", "peak memory growth (MB)"),
                            (axes[1], "s_per_batch", "time per batch (s)")):
        for method, style in styles.items():
            line = sorted((r["T"], r[key]) for r in ok if r["method"] == method and r["classes"] == 10)
            if line:
                ax.plot([t for t, _ in line], [v for _, v in line], **style)
            many = [(r["T"], r[key]) for r in ok if r["method"] == method and r["classes"] != 10]
            if many:
                ax.scatter([t for t, _ in many], [v for _, v in many], s=90, facecolors="none",
                           edgecolors=style["color"], linewidths=1.5, zorder=3,
                           label=f"{style['label']}, {next(r['classes'] for r in ok if r['classes'] != 10)} classes")
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts)
        ax.set_xticklabels([str(t) for t in Ts])
        ax.set_xlabel("time steps T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("Peak memory vs T (10 classes; hollow: more classes)")
    axes[1].set_title("Time per batch vs T")
    axes[0].legend(fontsize=8)
    run_args = payload.get("args", {})
    fig.suptitle(f"VGG-9 preset (width {run_args.get('width')}), batch {run_args.get('batch_size')}, "
                 "2x32x32 input, CPU", fontsize=10)
    return plotting.save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {2, 8}, 1 batch, results under results/quick/")
    p.add_argument("--batches", type=int, default=2, help="measured batches per configuration (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--width", type=float, default=0.25, help="VGG-9 width factor (default 0.25)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default 2)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default {DEFAULT_OUT}; with --quick {QUICK_OUT}, so that a smoke "
                        "run does not overwrite the full results); the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNG from the existing JSON at --out; runs nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=("tp", "bptt"), help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    if args.plot_only:
        return plotting.plot_only(os.path.abspath(args.out), plot, "tp-memory")
    Ts, class_T = ((2, 8), 2) if args.quick else ((2, 8, 32), 8)
    if args.quick:
        args.batches = 1
    configs = [(m, T, 10) for T in Ts for m in ("tp", "bptt")] + [(m, class_T, 100) for m in ("tp", "bptt")]
    try:
        from tqdm import tqdm
        configs_iter = tqdm(configs, desc="configurations", file=sys.stderr)
    except ImportError:
        configs_iter = configs
    results: List[Dict] = [run(m, T, c, args) for m, T, c in configs_iter]
    plotting.write_json(args.out, {"args": vars(args), "results": results})

    def get(method, T, classes):
        r = next(r for r in results if (r["method"], r["T"], r["classes"]) == (method, T, classes))
        return r.get("peak_growth_mb"), r

    print(f"VGG-9 preset (width {args.width}), 2x32x32 input, batch {args.batch_size}; peak memory growth (MB)")
    print("| configuration | TP | BPTT |")
    print("|---|---|---|")
    for T, classes in [(T, 10) for T in Ts] + [(class_T, 100)]:
        cells = []
        for m in ("tp", "bptt"):
            mb, r = get(m, T, classes)
            cells.append(f"{mb:.1f} MB, {r['s_per_batch']:.2f} s" if mb is not None else f"error: {r['error']}")
        print(f"| T={T}, {classes} classes | {cells[0]} | {cells[1]} |")
    tp_lo, _ = get("tp", Ts[0], 10)
    tp_hi, _ = get("tp", Ts[-1], 10)
    tp_10, _ = get("tp", class_T, 10)
    tp_100, _ = get("tp", class_T, 100)
    if None not in (tp_lo, tp_hi, tp_10, tp_100):
        print(f"- TP memory T={Ts[-1]} / T={Ts[0]}: {tp_hi / tp_lo:.3f} (target within 10%)")
        print(f"- TP memory 100 / 10 classes (T={class_T}): {tp_100 / tp_10:.3f} (target within 10%)")
    print(f"JSON: {args.out}")
    with open(args.out) as f:
        print(plot(json.load(f), os.path.splitext(args.out)[0] + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
