"""
SLTT-K: backpropagate only K of the T time steps
================================================

**What it shows.** Online SLTT computes each time step's gradient from that step alone, so nothing forces
it to backpropagate *every* step. SLTT-K (Meng et al., ICCV 2023) draws K distinct steps per batch and
backpropagates only those; the other T-K steps run forward under ``torch.no_grad`` (they still move the
neurons' membranes, and their outputs still count for the prediction). One option of the wrapper::

    learner = slr.wrap(net, rule="sltt", optimizer=opt, K=2)    # SLTT-2
    stats = learner.step(x_seq, y)                              # stats.steps: the steps backpropagated

The script trains the same SpikingJelly conv SNN from the same initial weights and data order four times:
plain BPTT, SLTT-1, SLTT-2 and SLTT-T (all steps, i.e. plain online SLTT), and compares held-out accuracy
and the median wall time per training batch.

**Data.** N-MNIST-like event frames made offline from MNIST-5k
(:func:`snn_localrules.data.load_nmnist5k_events`), ``[T, B, 2, 34, 34]``, 4000 training / 1000 held-out.

**How to run**::

    python examples/sltt_k.py                       # 4000 / 1000 samples, 2 epochs, T=10
    python examples/sltt_k.py --quick --epochs 1    # 320 / 200 samples, a smoke run
    python examples/sltt_k.py --T 16 --K 1 4 16     # other T and K values

**Expected result.** The time per batch grows with K: SLTT-1 and SLTT-2 take well under BPTT's time,
SLTT-T about as long as BPTT. Measured with the defaults (2 epochs, seed 0, one thread, a shared 2-core
machine): held-out accuracy BPTT 91.5%, SLTT-1 90.3%, SLTT-2 91.3%, SLTT-10 93.6%; time per batch 0.53x,
0.58x and 0.89x BPTT's. Times are wall-clock on your machine and vary with its load; one quick epoch on
320 samples is too short for meaningful accuracies (10-26%). Figure: ``<out>/sltt_k.png`` (accuracy and time per batch per
method). The last line printed is ``RESULT {...}``; its ``accuracy`` is that of the smallest K.
"""
import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import snn_localrules as slr
from snn_localrules.data import load_nmnist5k_events

# SpikingJelly 2's multi-step neurons ask torch for Triton kernels, and torch logs that Triton is missing (on a
# CPU machine); nothing here uses Triton
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(iterable, **kwargs):
        return iterable


def build_net(channels: int = 16) -> nn.Module:
    """A small multi-step SpikingJelly conv SNN: ``[T, B, 2, 34, 34]`` -> ``[T, B, 10]``."""
    lif = dict(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)
    net = nn.Sequential(
        layer.Conv2d(2, channels, 3, padding=1, bias=False), layer.BatchNorm2d(channels), neuron.LIFNode(**lif),
        layer.MaxPool2d(2),
        layer.Conv2d(channels, 2 * channels, 3, padding=1, bias=False), layer.BatchNorm2d(2 * channels),
        neuron.LIFNode(**lif),
        layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(2 * channels * 8 * 8, 128), neuron.LIFNode(**lif),
        layer.Linear(128, 10),
    )
    functional.set_step_mode(net, "m")
    return net


def run(method: str, K, initial: dict, data, args) -> dict:
    """Train a fresh copy of the net from ``initial`` with ``method`` ('bptt' or 'sltt' with ``K``)."""
    (x_train, y_train), (x_test, y_test) = data
    net = build_net()
    net.load_state_dict(initial)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    learner = slr.wrap(net, rule="sltt", optimizer=opt, K=K, seed=args.seed) if method == "sltt" else None
    generator = torch.Generator().manual_seed(args.seed)  # the same data order for every method
    label = "BPTT" if learner is None else f"SLTT-{K}"
    times, losses = [], []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in tqdm(range(0, len(x_train), args.batch_size), desc=f"{label} epoch {epoch + 1}",
                          disable=not sys.stderr.isatty(), leave=False):
            index = order[start : start + args.batch_size]
            x_seq, y = x_train[index].transpose(0, 1), y_train[index]
            tic = time.perf_counter()
            if learner is None:
                opt.zero_grad(set_to_none=True)
                out = net(x_seq)
                loss = sum(F.cross_entropy(out[t], y) for t in range(len(x_seq))) / len(x_seq)
                loss.backward()
                opt.step()
                functional.reset_net(net)
                losses.append(loss.item())
            else:
                losses.append(learner.step(x_seq, y).loss)
            times.append(time.perf_counter() - tic)
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x_test), 250):
            x_seq, y = x_test[start : start + 250].transpose(0, 1), y_test[start : start + 250]
            if learner is None:
                pred = net(x_seq).sum(0).argmax(-1)
                functional.reset_net(net)
            else:
                pred = learner.predict(x_seq)
            correct += int((pred == y).sum())
    if learner is not None:
        learner.unwrap()
    # the first batch pays one-off costs (allocations, lazy initialisation): leave it out of the median
    steady = times[1:] or times
    return {"method": label, "accuracy": 100.0 * correct / len(x_test),
            "s_per_batch": statistics.median(steady), "final_loss": losses[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="320 training / 200 held-out samples")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--T", type=int, default=10, help="time bins per sample")
    parser.add_argument("--K", type=int, nargs="+", default=None, help="K values (none given: 1, 2 and T)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, the initial weights and the batch order")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"), help="directory for the figure")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    Ks = sorted(set(args.K or [1, 2, args.T]))
    if Ks[0] < 1 or Ks[-1] > args.T:
        parser.error(f"every K must lie in 1..T={args.T}, got {Ks}")
    os.makedirs(args.out, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = load_nmnist5k_events(T=args.T, seed=args.seed)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:320], y_train[:320], x_test[:200], y_test[:200]
    data = ((x_train, y_train), (x_test, y_test))
    torch.manual_seed(args.seed)
    initial = copy.deepcopy(build_net().state_dict())

    results = [run("bptt", None, initial, data, args)]
    results += [run("sltt", K, initial, data, args) for K in Ks]
    print(f"T={args.T}, {len(x_train)} training / {len(x_test)} held-out samples, {args.epochs} epoch(s)")
    for r in results:
        print(f"{r['method']:8s} held-out accuracy {r['accuracy']:6.2f}%   {r['s_per_batch']:.3f} s / batch "
              f"({r['s_per_batch'] / results[0]['s_per_batch']:.2f}x BPTT)")

    figure = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, no figure written: pip install snn-localrules[examples]")
    else:
        names = [r["method"] for r in results]
        colors = ["tab:gray"] + ["tab:blue"] * len(Ks)
        fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(9, 3.6))
        ax_acc.bar(names, [r["accuracy"] for r in results], color=colors)
        ax_acc.set_ylabel("held-out accuracy (%)")
        ax_acc.set_title("Accuracy")
        ax_time.bar(names, [r["s_per_batch"] for r in results], color=colors)
        ax_time.set_ylabel("median wall time per batch (s)")
        ax_time.set_title(f"Time per batch (batch {args.batch_size}, T={args.T})")
        for ax, key, fmt in ((ax_acc, "accuracy", "{:.1f}"), (ax_time, "s_per_batch", "{:.2f}")):
            for i, r in enumerate(results):
                ax.annotate(fmt.format(r[key]), (i, r[key]), ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        figure = os.path.join(args.out, "sltt_k.png")
        fig.savefig(figure, dpi=110)
        plt.close(fig)
        print(f"figure written to {figure}")

    by_name = {r["method"]: r for r in results}
    result = {"example": "sltt_k", "accuracy": by_name[f"SLTT-{Ks[0]}"]["accuracy"], "K": Ks[0], "T": args.T,
              "epochs": args.epochs, "figure": figure}
    for r in results:
        key = r["method"].lower().replace("-", "")
        result[f"{key}_accuracy"] = r["accuracy"]
        result[f"{key}_s_per_batch"] = r["s_per_batch"]
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
