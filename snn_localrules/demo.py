"""The main job: train a SpikingJelly conv SNN on MNIST-5k with plain BPTT and with online SLTT.

Both runs use the same model, initial weights, data order, epochs and seed; each runs in a fresh process
so that its peak memory is its own. Prints held-out accuracy, peak memory growth and time per epoch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Dict, Iterator, List

import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model(seed: int) -> nn.Module:
    """A small SpikingJelly conv SNN in multi-step mode (LIF, tau=2, BN per layer, linear readout)."""
    # SpikingJelly 2's multi-step LIF asks torch for Triton kernels, and torch logs a warning where Triton
    # is missing (a CPU machine) into the middle of the progress output; nothing here uses Triton
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    torch.manual_seed(seed)
    lif = dict(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)
    model = nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False),
        layer.BatchNorm2d(16),
        neuron.LIFNode(**lif),
        layer.MaxPool2d(2),
        layer.Conv2d(16, 32, 3, padding=1, bias=False),
        layer.BatchNorm2d(32),
        neuron.LIFNode(**lif),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(32 * 7 * 7, 128),
        neuron.LIFNode(**lif),
        layer.Linear(128, 10),
    )
    functional.set_step_mode(model, "m")
    return model


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator:
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def to_sequence(images: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: the static image is the input current at each of T steps, [T, B, 1, 28, 28]."""
    return images.unsqueeze(0).expand(T, *images.shape)


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # no bar where stderr is a file or a pipe (a log would fill with carriage-return updates)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not sys.stderr.isatty())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def train_one(rule: str, epochs: int, T: int, batch_size: int, seed: int, limit: int) -> Dict:
    """Train with ``rule`` ('bptt' or 'sltt') in this process; return accuracy, memory and time."""
    from spikingjelly.activation_based import functional

    import snn_localrules as slr
    from snn_localrules.data import load_mnist5k

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    (x_tr, y_tr), (x_te, y_te) = load_mnist5k(seed=seed)
    if limit:
        x_tr, y_tr, x_te, y_te = x_tr[:limit], y_tr[:limit], x_te[: limit // 4], y_te[: limit // 4]
    model = build_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    baseline = _rss_kib()  # before any forward, wrapping or set-up
    learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce") if rule == "sltt" else None
    gen = torch.Generator().manual_seed(seed)
    epoch_times: List[float] = []
    n_batches = (len(x_tr) + batch_size - 1) // batch_size
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for xb, yb in _progress(batches(x_tr, y_tr, batch_size, gen), n_batches, f"{rule} epoch {epoch + 1}/{epochs}"):
            x_seq = to_sequence(xb, T)
            if learner is not None:
                learner.step(x_seq, yb)
            else:
                opt.zero_grad(set_to_none=True)
                out = model(x_seq)
                loss = sum(F.cross_entropy(out[t], yb) for t in range(T)) / T
                loss.backward()
                opt.step()
                functional.reset_net(model)
        epoch_times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_te), 256):
            xb, yb = x_te[i : i + 256], y_te[i : i + 256]
            if learner is not None:
                pred = learner.predict(to_sequence(xb, T))
            else:
                pred = model(to_sequence(xb, T)).sum(0).argmax(-1)
                functional.reset_net(model)
            correct += int((pred == yb).sum())
    if learner is not None:
        learner.unwrap()
    return {
        "rule": rule,
        "accuracy": correct / len(x_te),
        "peak_memory_mb": peak_kib / 1024,
        "seconds_per_epoch": sum(epoch_times) / len(epoch_times),
        "epochs": epochs,
        "T": T,
        "train_size": len(x_tr),
        "test_size": len(x_te),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="snn-localrules demo",
        description="Train a SpikingJelly conv SNN on offline MNIST-5k with BPTT and with online SLTT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=_positive_int, default=4, help="training epochs of each rule")
    parser.add_argument("--T", type=_positive_int, default=4, help="time steps (direct encoding)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the order")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch on 800 images: a smoke run, too short to compare the rules' accuracy")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["bptt", "sltt"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs, limit = (1, 800) if args.quick else (args.epochs, 0)
    if args.worker:
        print(json.dumps(train_one(args.worker, epochs, args.T, args.batch_size, args.seed, limit)))
        return 0
    results = []
    for rule in ("bptt", "sltt"):
        cmd = [sys.executable, "-m", "snn_localrules", "demo", "--worker", rule, "--T", str(args.T),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        if args.quick:
            cmd.append("--quick")
        print(f"training with {rule} ...", flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r0 = results[0]
    print(f"\nSpikingJelly conv SNN on MNIST-5k ({r0['train_size']} train / {r0['test_size']} held-out images), "
          f"T={args.T}, {epochs} epoch(s), batch {args.batch_size}, seed {args.seed}")
    print(f"{'rule':<14}{'held-out acc':>14}{'peak mem (MB)':>16}{'s/epoch':>10}")
    for r in results:
        name = "BPTT" if r["rule"] == "bptt" else "SLTT (online)"
        print(f"{name:<14}{100 * r['accuracy']:>13.2f}%{r['peak_memory_mb']:>16.1f}{r['seconds_per_epoch']:>10.1f}")
    b, s = results
    ratio = s["peak_memory_mb"] / max(b["peak_memory_mb"], 1e-9)
    if args.quick:
        # 25 BPTT updates leave its batch norms' running statistics far from the weights' (held-out
        # accuracy near chance in eval mode), while online SLTT has updated them at every step
        print(f"(--quick is a smoke run: too little training for the accuracies to compare the rules; run "
              f"without --quick for that.) Memory ratio {ratio:.2f}")
    else:
        print(f"SLTT - BPTT accuracy: {100 * (s['accuracy'] - b['accuracy']):+.2f} points; "
              f"memory ratio {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
