"""
Traces Propagation on the N-MNIST MLP (2312-200-10)
===================================================

**What it shows.** Traces Propagation (TP, Pes et al. 2025) trains an unchanged SpikingJelly MLP
forward-only: each hidden layer keeps an eligibility trace of its spikes, the label is carried through the
same weights by a fixed random projection (the label path), and each layer learns from a contrastive loss
between its data traces and its label-path traces. No gradient crosses layers or time steps; the optimizer
steps at every time step. One line turns training on::

    net = slr.presets.mlp_nmnist()                              # Flatten, Linear 2312-200, LIF, Linear 200-10
    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                       **slr.presets.tp_options("nmnist"))      # num_classes=10, trace_decay=0.8
    stats = learner.step(x_seq, y)                              # x_seq: [T, B, 2, 34, 34]
    stats.layer_losses, stats.readout_loss                      # per hidden layer, and the readout's CE
    pred = learner.predict(x_seq)                               # readout's argmax at the last step

**Data.** MNIST-5k turned offline into N-MNIST-like event frames (three simulated saccades of an event
camera, 34x34, ON/OFF; :func:`snn_localrules.data.load_nmnist5k_events`), 4000 training / 1000 held-out
samples, T=10.

**How to run**::

    python examples/tp_mlp.py                       # 3 epochs, all samples (~1 min on 2 CPU cores)
    python examples/tp_mlp.py --quick --epochs 1    # 800 / 200 samples, a smoke run

**Expected result.** Held-out accuracy well above chance after one epoch and about 84% after 3 epochs
(the project's benchmark, ``benchmarks/accuracy.py``, measured 84.0%; BPTT reaches about 90% there, and
the TP paper reports 97.3% on the real N-MNIST after full training). The hidden layer's contrastive loss
falls from about ln(32) = 3.47 (batch 32, no similarity structure) as its traces align with the label
path's. Figure: ``<out>/tp_mlp.png`` (held-out accuracy per epoch; layer and readout loss per batch).
The last line printed is ``RESULT {...}``.
"""
import argparse
import json
import logging
import os
import sys

import torch

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


def evaluate(learner, x, y, batch=250) -> float:
    """Held-out accuracy in percent; ``x`` sample-first ``[N, T, ...]``."""
    correct = sum(int((learner.predict(x[i : i + batch].transpose(0, 1)) == y[i : i + batch]).sum())
                  for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Traces Propagation on the N-MNIST MLP preset", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="800 training / 200 held-out samples")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--T", type=int, default=10, help="time bins per sample")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (one step per time step)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"), help="directory for the figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the initial weights and the batch order")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    (x_tr, y_tr), (x_te, y_te) = load_nmnist5k_events(T=args.T, seed=args.seed)
    if args.quick:
        x_tr, y_tr, x_te, y_te = x_tr[:800], y_tr[:800], x_te[:200], y_te[:200]
    net = slr.presets.mlp_nmnist(framework="spikingjelly")
    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), lr=args.lr),
                       **slr.presets.tp_options("nmnist", seed=args.seed))

    gen = torch.Generator().manual_seed(args.seed)
    accuracies, layer_curve, readout_curve = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_tr), generator=gen)
        correct = 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}",
                   disable=not sys.stderr.isatty(), leave=False)
        for i in bar:
            idx = order[i : i + args.batch_size]
            stats = learner.step(x_tr[idx].transpose(0, 1), y_tr[idx])
            correct += stats.correct(y_tr[idx])
            layer_curve.append(stats.layer_losses[0] / stats.T)  # mean over the T steps
            readout_curve.append(stats.readout_loss / stats.T)
        accuracies.append(evaluate(learner, x_te, y_te))
        # stats.correct reads each batch's last step after that batch's T-1 updates: optimistic, not a measure
        print(f"epoch {epoch + 1}: in-batch (optimistic) {100.0 * correct / len(y_tr):.2f}%, "
              f"held-out {accuracies[-1]:.2f}%, "
              f"layer loss {layer_curve[-1]:.3f}, readout loss {readout_curve[-1]:.3f}")
    learner.unwrap()

    figure = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed, no figure written: pip install snn-localrules[examples]")
    else:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.6))
        ax_acc.plot(range(1, len(accuracies) + 1), accuracies, marker="o", color="tab:red")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_xticks(range(1, len(accuracies) + 1))  # whole epochs (a one-epoch run had ticks 0.96...1.04)
        ax_acc.set_xlim(0.5, len(accuracies) + 0.5)
        ax_acc.set_ylabel("held-out accuracy (%)")
        ax_acc.set_title("TP, MLP 2312-200-10")
        ax_loss.plot(layer_curve, label="hidden layer (contrastive)")
        ax_loss.plot(readout_curve, label="readout (CE)")
        ax_loss.set_xlabel("batch")
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_loss.set_ylabel("loss per time step")
        ax_loss.legend()
        fig.tight_layout()
        figure = os.path.join(args.out, "tp_mlp.png")
        fig.savefig(figure, dpi=120)
        plt.close(fig)
        print(f"figure: {figure}")
    print("RESULT " + json.dumps({"example": "tp_mlp", "accuracy": round(accuracies[-1], 2), "figure": figure,
                                  "epochs": args.epochs, "train": len(y_tr), "test": len(y_te)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
