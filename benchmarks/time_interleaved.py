"""Time per batch, the methods interleaved in one process: the ratios that survive a noisy machine.

``memory_vs_T.py`` runs every configuration in a fresh process, which peak memory needs; but its times are
taken minutes apart, and on a shared machine the load drifts between them by more than the differences
being measured. Here, for each T, one process builds every method on the same VGG-like SNN (same initial
weights, same batch) and runs their batches round robin (A B C A B C ...), so every method sees the same
load; the table gives the median time per batch and each method's ratio to BPTT and to SpikingJelly's own
online SLTT.

    python benchmarks/time_interleaved.py [--Ts 2,4,8,16,32] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plotting  # noqa: E402
DEFAULT_OUT = os.path.join(HERE, "results", "time_interleaved.json")
METHODS = ("bptt", "sj_online", "sltt", "sltt_k2")  # the default set
#: on request (--methods): online SLTT with chunk=c, and zero-change SLTT (the user's BPTT loop on the
#: wrapped multi-step model) as default, keeping every membrane, and the fused neuron alone
EXTRA_METHODS = ("sltt_c2", "sltt_c4", "zc_fused", "zc_fused_keepmem", "zc_fused_nopack")


def build_methods(T: int, args) -> Dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    import snn_localrules as slr
    from memory_vs_T import CLASSES, IN_CHANNELS, SIZE, SPIKE_PROB, build_model, import_sj_online_learning

    generator = torch.Generator().manual_seed(args.seed + 1)
    x_seq = (torch.rand(T, args.batch_size, IN_CHANNELS, SIZE, SIZE, generator=generator) < SPIKE_PROB).float()
    y = torch.randint(0, CLASSES, (args.batch_size,), generator=generator)

    def model(sj_nodes: bool):
        torch.manual_seed(args.seed)  # every method starts from the same weights
        net = build_model(sltt_nodes=sj_nodes, tau=args.tau)
        if not sj_nodes:
            functional.set_step_mode(net, "m")
        return net, torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)

    methods: Dict[str, Callable[[], None]] = {}
    if "bptt" in args.methods:
        net_b, opt_b = model(False)

        def bptt():
            opt_b.zero_grad(set_to_none=True)
            out = net_b(x_seq)
            (sum(F.cross_entropy(out[t], y) for t in range(T)) / T).backward()
            opt_b.step()
            functional.reset_net(net_b)

        methods["bptt"] = bptt
    if "sj_online" in args.methods:
        online_learning, _ = import_sj_online_learning()
        net_s, opt_s = model(True)
        x_bt, y_bt = x_seq.transpose(0, 1), y.unsqueeze(1).expand(args.batch_size, T)

        def sj_online():
            online_learning.ottt_online_training(model=net_s, optimizer=opt_s, x_seq=x_bt, target_seq=y_bt,
                                                 f_loss_t=lambda o, t: F.cross_entropy(o, t) / T, online=False)
            functional.reset_net(net_s)

        methods["sj_online"] = sj_online
    for name, K, chunk in (("sltt", None, 1), ("sltt_k2", 2, 1), ("sltt_c2", None, 2), ("sltt_c4", None, 4)):
        if name in args.methods:
            net, opt = model(False)
            learner = slr.wrap(net, rule="sltt", optimizer=opt, K=K, seed=args.seed, chunk=chunk)
            methods[name] = (lambda learner=learner: learner.step(x_seq, y))
    for name, pack, recompute in (("zc_fused", True, True), ("zc_fused_keepmem", True, False),
                                  ("zc_fused_nopack", False, False)):
        if name in args.methods:
            net, opt = model(False)
            slr.wrap(net, rule="sltt", pack_spikes=pack, recompute_membrane=recompute)

            def zero_change(net=net, opt=opt):
                opt.zero_grad(set_to_none=True)
                out = net(x_seq)
                (sum(F.cross_entropy(out[t], y) for t in range(T)) / T).backward()
                opt.step()
                functional.reset_net(net)

            methods[name] = zero_change
    return methods


def measure(T: int, args) -> Dict[str, List[float]]:
    import torch

    torch.set_num_threads(args.threads)
    methods = build_methods(T, args)
    for run in methods.values():  # warm-up
        run()
    times: Dict[str, List[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--Ts", default="2,4,8,16,32")
    p.add_argument("--rounds", type=int, default=7, help="timed batches per method and T")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tau", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="T in {2, 4}, 2 rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS + EXTRA_METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    Ts = [2, 4] if args.quick else [int(t) for t in args.Ts.split(",")]
    rounds = 2 if args.quick else args.rounds
    args.rounds = rounds
    out = args.out or (os.path.join(HERE, "results", "quick", "time_interleaved.json") if args.quick else DEFAULT_OUT)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda it, **kw: it  # noqa: E731
    results: Dict[int, Dict[str, List[float]]] = {}
    for T in tqdm(Ts, desc="T", disable=not sys.stderr.isatty()):
        results[T] = measure(T, args)

    methods = list(next(iter(results.values())))
    print(f"Median s / batch over {rounds} interleaved rounds (batch {args.batch_size}, {args.threads} threads); "
          "ratios in brackets: to BPTT / to SpikingJelly online SLTT")
    print("| T | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    table = {}
    for T, times in results.items():
        med = {name: statistics.median(v) for name, v in times.items()}
        table[T] = med
        cells = []
        for name in methods:
            ratios = []
            for base in ("bptt", "sj_online"):
                if base in med and base != name:
                    ratios.append(f"{med[name] / med[base]:.2f}")
                else:
                    ratios.append("-")
            cells.append(f"{med[name]:.3f} ({' / '.join(ratios)})")
        print(f"| {T} | " + " | ".join(cells) + " |")
    plotting.write_json(out, {"args": vars(args), "times_s": {str(T): v for T, v in results.items()},
                              "median_s": {str(T): v for T, v in table.items()}})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
