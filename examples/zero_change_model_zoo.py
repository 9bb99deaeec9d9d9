"""
Zero-change SLTT on a network from SpikingJelly's model zoo
===========================================================

**What it shows.** ``spikingjelly.activation_based.model.parametric_lif_net.NMNISTNet`` -- the N-MNIST
network of the Parametric-LIF paper (Fang et al., ICCV 2021) as SpikingJelly ships it: conv-BN-PLIF blocks,
max pooling, dropout, two spiking linear layers and a ``VotingLayer`` -- trained with the loop of
SpikingJelly's tutorials (firing rate over time, MSE against the one-hot label, ``functional.reset_net``),
unchanged. One line turns the loop's gradients into SLTT's::

    learner = slr.wrap(net, rule="sltt")    # zero-change mode: no optimizer, your loop stays as it is

Each neuron then enters every step with its carried membrane detached, so ``loss.backward()`` follows the
spatial paths only. The PLIF neurons' learnable time constants get their SLTT gradient too. Before
training, the script also measures on one batch how close SLTT's gradient is to BPTT's (cosine similarity
over all parameters, on a copy of the net that is wrapped and unwrapped again).

The model is used as the zoo builds it, at a CPU-friendly width (``channels=16`` instead of the paper's
128; ``channels`` is an argument of the zoo class). Zoo models that need ``torchvision``
(``spiking_resnet``, ``spiking_vgg``, ``sew_resnet``) do not import in this project's torchvision-free
install; ``parametric_lif_net`` needs only torch.

**Data.** N-MNIST-like event frames made offline from MNIST-5k
(:func:`snn_localrules.data.load_nmnist5k_events`), ``[T, B, 2, 34, 34]``, 4000 training / 1000 held-out.

**How to run**::

    python examples/zero_change_model_zoo.py                       # 4000 / 1000 samples, 2 epochs
    python examples/zero_change_model_zoo.py --quick --epochs 1    # 320 / 200 samples, a smoke run

**Expected result.** The training loss falls and the held-out accuracy rises every epoch: 79.7% and
89.4% after epochs 1 and 2 with the defaults (seed 0); the SLTT/BPTT gradient cosine on the first batch is
0.973 (PLIF starts at tau=2, a fast-decaying neuron). One quick epoch is too short for this net: its output
layer starts firing only after about 25 batches, so the quick run ends near chance. Figure: ``<out>/zero_change_model_zoo.png``
(training loss per batch and held-out accuracy per epoch). The last line printed is ``RESULT {...}``.
"""
import argparse
import copy
import json
import logging
import os
import sys

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net

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


def tutorial_loss(net, frames: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """SpikingJelly's tutorial loss: MSE between the firing rate over time and the one-hot label."""
    out_fr = net(frames).mean(0)  # [T, B, 10] -> [B, 10]
    return F.mse_loss(out_fr, F.one_hot(label, 10).float())


def flat_grad(net) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def gradient_cosine(net, frames: torch.Tensor, label: torch.Tensor, seed: int) -> float:
    """Cosine similarity of SLTT's and BPTT's gradients on one batch, on a copy of ``net``.

    The same seed before each pass gives both the same dropout masks."""
    probe = copy.deepcopy(net)
    grads = []
    for rule in ("bptt", "sltt"):
        learner = slr.wrap(probe, rule="sltt") if rule == "sltt" else None
        probe.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        tutorial_loss(probe, frames, label).backward()
        functional.reset_net(probe)
        grads.append(flat_grad(probe))
        if learner is not None:
            learner.unwrap()
    return float(F.cosine_similarity(grads[0], grads[1], dim=0))


def mean_tau(net) -> float:
    """Mean membrane time constant of the PLIF neurons (tau = 1 / sigmoid(w))."""
    taus = [1.0 / float(m.w.detach().sigmoid()) for m in net.modules() if isinstance(m, neuron.ParametricLIFNode)]
    return sum(taus) / len(taus)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="320 training / 200 held-out samples")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--T", type=int, default=10, help="time bins per sample")
    parser.add_argument("--channels", type=int, default=16, help="conv channels of NMNISTNet (paper: 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, the initial weights and the batch order")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"), help="directory for the figure")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    show_bars = sys.stderr.isatty()

    (x_train, y_train), (x_test, y_test) = load_nmnist5k_events(T=args.T, seed=args.seed)
    if args.quick:
        x_train, y_train, x_test, y_test = x_train[:320], y_train[:320], x_test[:200], y_test[:200]

    # ---- the zoo model, built and set to multi-step the usual SpikingJelly way ----
    net = parametric_lif_net.NMNISTNet(channels=args.channels, spiking_neuron=neuron.ParametricLIFNode,
                                       surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(net, "m")
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)

    first = torch.arange(min(args.batch_size, len(x_train)))
    net.train()
    cosine = gradient_cosine(net, x_train[first].transpose(0, 1), y_train[first], args.seed)
    print(f"first batch: cosine(SLTT gradient, BPTT gradient) = {cosine:.4f}")

    # ---- the one added line: zero-change SLTT ----
    learner = slr.wrap(net, rule="sltt")

    # ---- SpikingJelly's tutorial loop, unchanged ----
    generator = torch.Generator().manual_seed(args.seed)
    losses, epoch_end, test_accuracy = [], [], []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in tqdm(range(0, len(x_train), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}",
                          disable=not show_bars, leave=False):
            index = order[start : start + args.batch_size]
            frame, label = x_train[index].transpose(0, 1), y_train[index]  # [T, B, 2, 34, 34], [B]
            optimizer.zero_grad()
            loss = tutorial_loss(net, frame, label)
            loss.backward()
            optimizer.step()
            functional.reset_net(net)
            losses.append(loss.item())
        epoch_end.append(len(losses))

        net.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(x_test), 250):
                frame, label = x_test[start : start + 250].transpose(0, 1), y_test[start : start + 250]
                correct += int((net(frame).mean(0).argmax(1) == label).sum())
                functional.reset_net(net)
        test_accuracy.append(100.0 * correct / len(x_test))
        print(f"epoch {epoch + 1}: last train loss {losses[-1]:.4f}, held-out acc {test_accuracy[-1]:.2f}%, "
              f"mean PLIF tau {mean_tau(net):.3f}", flush=True)

    learner.unwrap()  # the zoo model, exactly as it was built (with its trained weights)

    figure = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, no figure written: pip install snn-localrules[examples]")
    else:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(range(1, len(losses) + 1), losses, lw=0.8)
        ax_loss.set_xlabel("batch")
        ax_loss.set_ylabel("training loss (MSE of firing rate)")
        ax_loss.set_title("NMNISTNet (zoo), zero-change SLTT")
        ax_acc.plot(range(1, args.epochs + 1), test_accuracy, marker="o")
        ax_acc.set_xticks(range(1, args.epochs + 1))
        ax_acc.set_xlabel("epoch")
        ax_acc.set_xticks(range(1, args.epochs + 1))  # whole epochs (a one-epoch run had ticks 0.96...1.04)
        ax_acc.set_xlim(0.5, args.epochs + 0.5)
        ax_acc.set_ylabel("held-out accuracy (%)")
        ax_acc.set_title(f"T={args.T}; grad cosine SLTT/BPTT at start {cosine:.3f}")
        fig.tight_layout()
        figure = os.path.join(args.out, "zero_change_model_zoo.png")
        fig.savefig(figure, dpi=110)
        plt.close(fig)
        print(f"figure written to {figure}")

    result = {
        "example": "zero_change_model_zoo",
        "model": "spikingjelly.activation_based.model.parametric_lif_net.NMNISTNet",
        "channels": args.channels,
        "accuracy": test_accuracy[-1],
        "final_loss": losses[-1],
        "grad_cosine_sltt_bptt": cosine,
        "mean_plif_tau": mean_tau(net),
        "epochs": args.epochs,
        "T": args.T,
        "figure": figure,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
