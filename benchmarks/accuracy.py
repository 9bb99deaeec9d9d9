"""Accuracy, peak memory and time of BPTT, SLTT, SLTT-K and TP on offline event data.

Data: MNIST-5k turned into N-MNIST-like event frames (three simulated saccades, 34x34, ON/OFF channels),
4000 train / 1000 held-out samples, T time bins. Models: the N-MNIST MLP preset (2312-200-10) and the VGG-9
preset at reduced width, both SpikingJelly, multi-step. Every (model, rule) pair runs in a fresh process
from the same initial weights, data order and seed; peak memory is the growth of the process's peak RSS
over a baseline taken before any wrapping or forward.

    python benchmarks/accuracy.py                 # full run (several minutes on 2 CPU cores)
    python benchmarks/accuracy.py --quick         # smoke run: 1 epoch on 400 samples, results/quick/
    python benchmarks/accuracy.py --plot-only     # redraw results/accuracy.png from the JSON
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
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts; this sits beside them)

RULES = ("bptt", "sltt", "sltt_k", "tp")
MODELS = ("mlp", "vgg9")
RESULT_TAG = "ACCURACY_RESULT "
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "accuracy.json")
QUICK_OUT = os.path.join(HERE, "results", "quick", "accuracy.json")
MB = 1024.0 * 1024.0


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    from memory_vs_T import peak_rss_bytes as vm_hwm  # VmHWM: not polluted by a large parent's peak

    return vm_hwm()


#: VGG-9 neurons: threshold 0.5 as in the TP authors' DVS-CIFAR10 runs. With the preset's scaled weight
#: standardization (gain 1.8 / sqrt(fan_in)) and threshold 1 the sparse event input dies out with depth
#: (last layer's rate ~1e-4 at width 0.125); at 0.5 every layer fires at 0.1-0.3.
VGG_NEURON_KWARGS = {"v_threshold": 0.5}
#: TP's rule settings (slr.presets.tp_options) per model: the VGG-9 runs the authors' DVS-CIFAR10 setting,
#: whose threshold 0.5 goes with trace decay 0.19. The trace decay sets the scale of the similarity logits
#: (a trace sums about 1/(1 - beta) steps of spikes): at this library's default 0.8 the deep layers' logits
#: start saturated, their losses flatten them and with them the class information (VGG-9 TP 45.8% held-out
#: at 0.8, 83.4% at 0.19, in two full runs of this benchmark).
TP_SETTING = {"mlp": "nmnist", "vgg9": "dvs-cifar10"}


def build(model_name: str, width: float):
    import snn_localrules as slr

    if model_name == "mlp":
        return slr.presets.mlp_nmnist(framework="spikingjelly")
    return slr.presets.vgg9(in_channels=2, num_classes=10, input_size=34, width=width, framework="spikingjelly",
                            neuron_kwargs=VGG_NEURON_KWARGS)


def worker(args) -> Dict:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    import snn_localrules as slr
    from snn_localrules.data import load_nmnist5k_events

    torch.set_num_threads(args.threads)
    (x_tr, y_tr), (x_te, y_te) = load_nmnist5k_events(T=args.T, seed=args.seed)
    if args.limit:
        x_tr, y_tr = x_tr[: args.limit], y_tr[: args.limit]
        x_te, y_te = x_te[: args.limit // 4], y_te[: args.limit // 4]
    torch.manual_seed(args.seed)
    model = build(args.model, args.width)
    lr = args.tp_lr if args.rule == "tp" else args.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    slr.plugin_manager()
    baseline = current_rss_bytes()
    if args.rule == "bptt":
        learner = None
    elif args.rule == "tp":
        learner_options = slr.presets.tp_options(TP_SETTING[args.model], seed=args.seed)
        learner = slr.wrap(model, rule="tp", optimizer=opt, **learner_options)
    else:
        learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce",
                           K=args.K if args.rule == "sltt_k" else None, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    batches = 0
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), args.batch_size):
            idx = order[i : i + args.batch_size]
            x_seq, y = x_tr[idx].transpose(0, 1), y_tr[idx]
            if learner is None:
                opt.zero_grad(set_to_none=True)
                out = model(x_seq)
                loss = sum(F.cross_entropy(out[t], y) for t in range(args.T)) / args.T
                loss.backward()
                opt.step()
                functional.reset_net(model)
            else:
                learner.step(x_seq, y)
            batches += 1
    train_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_te), 200):
            x_seq, y = x_te[i : i + 200].transpose(0, 1), y_te[i : i + 200]
            if learner is None:
                pred = model(x_seq).sum(0).argmax(-1)
                functional.reset_net(model)
            else:
                pred = learner.predict(x_seq)
            correct += int((pred == y).sum())
    if learner is not None:
        learner.unwrap()
    return {
        "model": args.model, "rule": args.rule, "accuracy": correct / len(x_te),
        "tp_options": dict(learner_options) if args.rule == "tp" else None,
        "peak_growth_mb": (peak - baseline) / MB, "s_per_batch": train_s / max(batches, 1),
        "epochs": args.epochs, "T": args.T, "train": len(x_tr), "test": len(x_te),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def progress(iterable, total):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="configurations", file=sys.stderr)


RULE_COLORS = {"bptt": "dimgray", "sltt": "tab:blue", "sltt_k": "tab:green", "tp": "tab:red"}


def rule_label(rule: str, K: int) -> str:
    return {"bptt": "BPTT", "sltt": "SLTT", "sltt_k": f"SLTT-{K}", "tp": "TP"}.get(rule, rule)


def model_label(model: str, width: float) -> str:
    return "MLP 2312-200-10" if model == "mlp" else f"VGG-9 (width {width})"


def plot(payload: Dict, path: str) -> str:
    """Bar charts from a JSON written by :func:`main`: held-out accuracy (top row) and peak memory growth
    (bottom row), one column per model, one bar per rule. Failed configurations are left out.

    :return: a one-line message saying where the plot went (or why there is none).
    """
    plt = plotting.pyplot()
    if plt is None:
        return plotting.NO_MATPLOTLIB
    run_args = payload.get("args", {})
    K, width = run_args.get("K", 2), run_args.get("width", 0.125)
    ok = [r for r in payload["results"] if "error" not in r]
    models = [m for m in dict.fromkeys(r["model"] for r in ok)]
    if not models:
        return "no successful configuration in the JSON: plot skipped."
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6), squeeze=False)
    for col, model in enumerate(models):
        rows = [r for r in ok if r["model"] == model]
        names = [rule_label(r["rule"], K) for r in rows]
        colors = [RULE_COLORS.get(r["rule"], "tab:gray") for r in rows]
        for row, (key, scale, ylabel, fmt) in enumerate((
            ("accuracy", 100.0, "held-out accuracy (%)", "{:.1f}"),
            ("peak_growth_mb", 1.0, "peak memory growth (MB)", "{:.0f}"),
        )):
            ax = axes[row][col]
            values = [scale * r[key] for r in rows]
            ax.bar(names, values, color=colors)
            for i, v in enumerate(values):
                ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.margins(y=0.12)
            if row == 0:
                ax.set_title(model_label(model, width))
                ax.set_ylim(0, 108)  # room above 100% for a value's label
                ax.axhline(10.0, color="gray", linewidth=0.8, linestyle=":", label="chance (10 classes)")
                ax.legend(loc="lower right", fontsize=7)
    r0 = ok[0]
    fig.suptitle(f"N-MNIST-like events (MNIST-5k, {r0.get('train')} train / {r0.get('test')} held-out), "
                 f"T={r0.get('T')}, {r0.get('epochs')} epoch(s), CPU", fontsize=10)
    return plotting.save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train (default all)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES, help="rules to compare (default all)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3; --quick: 1)")
    p.add_argument("--T", type=int, default=10, help="time steps per sample (default 10)")
    p.add_argument("--K", type=int, default=2, help="steps SLTT-K backpropagates (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of BPTT, SLTT and SLTT-K (default 1e-3)")
    p.add_argument("--tp-lr", type=float, default=1e-3, help="Adam learning rate of TP (default 1e-3)")
    p.add_argument("--width", type=float, default=0.125, help="VGG-9 width factor (default 0.125)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only this many training samples (and a quarter as many held-out; default all)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default 2)")
    p.add_argument("--seed", type=int, default=0, help="model, data order and TP projection seed (default 0)")
    p.add_argument("--quick", action="store_true", help="1 epoch on 400 samples, results under results/quick/")
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default {DEFAULT_OUT}; with --quick {QUICK_OUT}, so that a smoke "
                        "run does not overwrite the full results); the PNG goes next to it")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNG from the existing JSON at --out; runs nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--rule", choices=RULES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.plot_only:
        return plotting.plot_only(os.path.abspath(args.out), plot, "accuracy")
    if args.quick:
        args.epochs, args.limit = 1, args.limit or 400
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    configs = [(m, r) for m in args.models for r in args.rules]
    results: List[Dict] = []
    for model, rule in progress(configs, len(configs)):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--rule", rule]
        for name in ("epochs", "T", "K", "batch_size", "lr", "tp_lr", "width", "limit", "threads", "seed"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if not lines:
            results.append({"model": model, "rule": rule, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(lines[-1][len(RESULT_TAG):]))
    plotting.write_json(args.out, {"args": vars(args), "results": results})
    names = {"bptt": "BPTT", "sltt": "SLTT", "sltt_k": f"SLTT-{args.K}", "tp": "TP"}
    r0 = next((r for r in results if "error" not in r), {})
    print(f"\nN-MNIST-like events from MNIST-5k ({r0.get('train')} train / {r0.get('test')} held-out), "
          f"T={args.T}, {args.epochs} epoch(s), batch {args.batch_size}, seed {args.seed}")
    print("| model | rule | held-out accuracy | peak memory growth | s / batch |")
    print("|---|---|---|---|---|")
    for r in results:
        label = "MLP 2312-200-10" if r["model"] == "mlp" else f"VGG-9 (width {args.width})"
        if "error" in r:
            print(f"| {label} | {names[r['rule']]} | error: {r['error']} | | |")
        else:
            print(f"| {label} | {names[r['rule']]} | {100 * r['accuracy']:.2f}% | {r['peak_growth_mb']:.1f} MB "
                  f"| {r['s_per_batch']:.3f} |")
    print(f"\nJSON: {args.out}")
    with open(args.out) as f:
        print(plot(json.load(f), os.path.splitext(args.out)[0] + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
