"""
Traces Propagation on a reduced VGG-9
=====================================

**What it shows.** TP on the TP paper's convolutional network: the VGG-9 preset (8 bias-free 3x3 convs
with scaled weight standardization, gain 1.8, LIF after each, max-pool after convs 2/4/6, adaptive average
pool to 2x2, linear readout), built at reduced width for a CPU. For conv layers TP compares traces per
position over the channels and averages over positions (``spatial="mean"``, the authors' code), so the
similarity logits do not grow with the map's area::

    net = slr.presets.vgg9(in_channels=2, num_classes=10, input_size=34, width=0.125,
                           neuron_kwargs={"v_threshold": 0.5})
    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), 1e-3),
                       **slr.presets.tp_options("dvs-cifar10"))   # num_classes=10, trace_decay=0.19
    stats = learner.step(x_seq, y)             # stats.layer_losses: one contrastive loss per conv layer

Threshold 0.5 and trace decay 0.19 (the authors' DVS-CIFAR10 values, which go together): at threshold 1
the sparse event input dies out over the eight layers of the narrow network, and a silent layer cannot
learn under TP (its traces are zero); at the rule's default trace decay 0.8 the deep layers' similarity
logits (products of traces) start saturated, and their losses flatten the class information away.

**Data.** N-MNIST-like event frames from MNIST-5k (:func:`snn_localrules.data.load_nmnist5k_events`),
``[T, B, 2, 34, 34]``, T=10.

**How to run**::

    python examples/tp_vgg9.py                        # 2000 training samples, 2 epochs, width 0.125
    python examples/tp_vgg9.py --train 4000 --epochs 3 --width 0.25
    python examples/tp_vgg9.py --quick --epochs 1     # 128 / 100 samples, a smoke run

**Expected result.** About 60% held-out with the defaults (59.7% after 2 epochs, 62.5% after the first, on
this project's 2-core CPU; the README's accuracy table: 83.4% with 4000 samples and 3 epochs, BPTT 96.0%).
The figure shows what limits it: the contrastive losses of the first, narrow layers (8 and 16 channels)
stay at ln(B), so they learn little, while the deeper layers' fall (the dips are each epoch's last, smaller
batch). Figure: ``<out>/tp_vgg9.png`` (held-out accuracy per epoch; each layer's loss
per batch). The last line printed is ``RESULT {...}``.
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


def evaluate(learner, x, y, batch=200) -> float:
    """Held-out accuracy in percent; ``x`` sample-first ``[N, T, ...]``."""
    correct = sum(int((learner.predict(x[i : i + batch].transpose(0, 1)) == y[i : i + batch]).sum())
                  for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Traces Propagation on a reduced VGG-9", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 training / 100 held-out samples")
    p.add_argument("--epochs", type=int, default=2, help="training epochs")
    p.add_argument("--train", type=int, default=2000, help="training samples used (of 4000)")
    p.add_argument("--width", type=float, default=0.125, help="VGG-9 channel multiplier")
    p.add_argument("--threshold", type=float, default=0.5, help="LIF threshold")
    p.add_argument("--T", type=int, default=10, help="time bins per sample")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (one step per time step)")
    p.add_argument("--trace-decay", type=float, default=slr.presets.tp_options("dvs-cifar10")["trace_decay"],
                   help="TP's trace decay beta (default: the authors' DVS-CIFAR10 value)")
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
    n_train, n_test = (128, 100) if args.quick else (args.train, len(y_te))
    x_tr, y_tr, x_te, y_te = x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]
    net = slr.presets.vgg9(in_channels=2, num_classes=10, input_size=34, width=args.width,
                           neuron_kwargs={"v_threshold": args.threshold})
    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), lr=args.lr),
                       **{**slr.presets.tp_options("dvs-cifar10", seed=args.seed), "trace_decay": args.trace_decay})

    gen = torch.Generator().manual_seed(args.seed)
    accuracies, layer_curves, readout_curve = [], [], []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_tr), generator=gen)
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}",
                   disable=not sys.stderr.isatty(), leave=False)
        for i in bar:
            idx = order[i : i + args.batch_size]
            stats = learner.step(x_tr[idx].transpose(0, 1), y_tr[idx])
            layer_curves.append([v / stats.T for v in stats.layer_losses])
            readout_curve.append(stats.readout_loss / stats.T)
            if stats.silent_layers:
                print(f"silent layers in this batch: {stats.silent_layers}")
        accuracies.append(evaluate(learner, x_te, y_te))
        print(f"epoch {epoch + 1}: held-out {accuracies[-1]:.2f}%, layer losses "
              + " ".join(f"{v:.2f}" for v in layer_curves[-1]) + f", readout {readout_curve[-1]:.3f}")
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
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax_acc.plot(range(1, len(accuracies) + 1), accuracies, marker="o", color="tab:red")
        ax_acc.axhline(10.0, color="gray", linestyle=":", linewidth=0.8)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_xticks(range(1, len(accuracies) + 1))  # whole epochs (a one-epoch run had ticks 0.96...1.04)
        ax_acc.set_xlim(0.5, len(accuracies) + 0.5)
        ax_acc.set_ylabel("held-out accuracy (%)")
        ax_acc.set_title(f"TP, VGG-9 width {args.width}")
        curves = torch.tensor(layer_curves)
        for layer_index in range(curves.shape[1]):
            ax_loss.plot(curves[:, layer_index], label=f"conv {layer_index + 1}", linewidth=1)
        ax_loss.plot(readout_curve, label="readout (CE)", color="black", linewidth=1.5)
        ax_loss.set_xlabel("batch")
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_loss.set_ylabel("loss per time step")
        ax_loss.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        figure = os.path.join(args.out, "tp_vgg9.png")
        fig.savefig(figure, dpi=120)
        plt.close(fig)
        print(f"figure: {figure}")
    print("RESULT " + json.dumps({"example": "tp_vgg9", "accuracy": round(accuracies[-1], 2), "figure": figure, "epochs": args.epochs,
                                  "width": args.width, "trace_decay": args.trace_decay, "train": len(y_tr),
                                  "test": len(y_te)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
