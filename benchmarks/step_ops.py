"""What one online step costs the host: operations dispatched per step, and host time where the host is
the bottleneck.

On a GPU at small batch an online SLTT step is bound by its launches, not by arithmetic: each operation
the step dispatches (forward, loss, backward, gradient accumulation) costs the host a few microseconds and
the GPU one kernel launch or more, however small the tensors. Both can be counted on a CPU:

* **ops per step**: every aten operation one training batch dispatches, counted with a
  ``TorchDispatchMode`` and divided by T, split into *kernel* operations (each at least one kernel on a
  GPU) and the *others* (views such as ``view``, ``detach``, ``select``; allocations; host queries: no
  kernel, but each costs the host a dispatch). The same counts on
  any device, except that SpikingJelly's BPTT runs other kernels on CUDA (so it is not counted here).
* **host time per step**: the same batch timed on the CPU at a tiny size (width 0.125, 16x16 input, batch
  2), where arithmetic is negligible and what is left is the dispatch and Python of each step: the part
  a GPU cannot hide at small batch (CUDA graphs remove it; ``gpu.py --cuda-graphs`` measures that on a
  GPU). Medians of interleaved rounds, one thread.

Methods, on the VGG-11-like network of ``gpu.py``:

* ``sj_online``   -- SpikingJelly's own online SLTT (``SLTTLIFNode``, ``ottt_online_training``).
* ``sltt_c1``     -- this plugin's online SLTT, chunk 1, defaults (packed spikes, no membrane kept for
  batch-norm-fed neurons).
* ``sltt_c1_plain`` -- the same without packing and membrane rebuild.
* ``sltt_c2``     -- chunk 2 (two steps per forward call and backward).

    python benchmarks/step_ops.py [--T 10] [--rounds 15] [--methods ...]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "step_ops.json")

METHODS = {
    "sj_online": None,
    "sltt_c1": {"chunk": 1},
    "sltt_c1_plain": {"chunk": 1, "pack_spikes": False, "recompute_membrane": False},
    "sltt_c2": {"chunk": 2},
}
LABELS = {"sj_online": "SJ online SLTT", "sltt_c1": "SLTT chunk 1", "sltt_c1_plain": "SLTT chunk 1, unpacked",
          "sltt_c2": "SLTT chunk 2"}
#: operations that launch no kernel on any device: views of a tensor's memory, allocations (the caching
#: allocator on CUDA), and queries answered on the host
NO_KERNEL_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.expand", "aten.unsqueeze",
    "aten.squeeze", "aten.select", "aten.slice", "aten.permute", "aten.alias", "aten.detach",
    "aten.as_strided", "aten.reshape", "aten.flatten", "aten.unbind", "aten.split", "aten.chunk",
    "aten.unflatten", "aten.split_with_sizes", "aten.lift_fresh", "aten.empty", "aten.empty_like",
    "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.promote_types",
    "profiler._record_function_enter_new", "profiler._record_function_exit",
})


def op_counter():
    """A ``TorchDispatchMode`` that counts the aten operations dispatched while it is active."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    return Counter()


def make_batch_fn(method: str, T: int, B: int, width: float, size: int) -> Callable[[], Any]:
    """One training batch of ``method`` on a fresh model (SGD with momentum, mean CE over steps)."""
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    from gpu import CLASSES, IN_CHANNELS, SPIKE_PROB, build_vgg11, import_sj_online_learning

    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(T, B, IN_CHANNELS, size, size, generator=generator) < SPIKE_PROB).float()
    y = torch.randint(0, CLASSES, (B,), generator=generator)
    torch.manual_seed(0)
    if method == "sj_online":
        model = build_vgg11(width, "avg", 2.0, sltt_nodes=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        online_learning, _ = import_sj_online_learning()
        x_bt, y_bt = x.transpose(0, 1), y.unsqueeze(1).expand(B, T)

        def batch() -> None:
            online_learning.ottt_online_training(model=model, optimizer=optimizer, x_seq=x_bt, target_seq=y_bt,
                                                 f_loss_t=lambda o, t: F.cross_entropy(o, t) / T, online=False)
            functional.reset_net(model)

        return batch
    import snn_localrules as slr

    model = build_vgg11(width, "avg", 2.0)
    functional.set_step_mode(model, "m")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    learner = slr.wrap(model, rule="sltt", optimizer=optimizer, loss="ce", **METHODS[method])
    return lambda: learner.step(x, y)


def count_ops(batch: Callable[[], Any]) -> Dict[str, int]:
    counter = op_counter()
    with counter:
        batch()
    return dict(counter.counts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier of gpu.py's VGG-11")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    import torch

    from plotting import write_json

    torch.set_num_threads(1)
    batches = {m: make_batch_fn(m, args.T, args.batch_size, args.width, args.size) for m in args.methods}
    for batch in batches.values():
        batch()  # first batch: lazy state, optimizer buffers
    ops = {m: count_ops(batch) for m, batch in batches.items()}
    times: Dict[str, List[float]] = {m: [] for m in batches}
    for index in range(args.warmup + args.rounds):
        for m, batch in batches.items():  # interleaved: drift of the machine hits every method alike
            start = time.perf_counter()
            batch()
            if index >= args.warmup:
                times[m].append(time.perf_counter() - start)
    rows = []
    for m in args.methods:
        kernels = sum(n for op, n in ops[m].items() if op not in NO_KERNEL_OPS)
        others = sum(n for op, n in ops[m].items() if op in NO_KERNEL_OPS)
        rows.append({"method": m, "kernel_ops_per_step": kernels / args.T, "other_ops_per_step": others / args.T,
                     "host_ms_per_step": statistics.median(times[m]) * 1000 / args.T,
                     "times_s": times[m], "ops": ops[m]})
    base = next((r for r in rows if r["method"] == "sj_online"), None)
    lines = ["| method | kernel ops / step | other ops / step | host time / step |", "|---|---|---|---|"]
    for r in rows:
        ratio = (f" ({r['kernel_ops_per_step'] / base['kernel_ops_per_step']:.2f})",
                 f" ({r['host_ms_per_step'] / base['host_ms_per_step']:.2f})") if base else ("", "")
        lines.append(f"| {LABELS[r['method']]} | {r['kernel_ops_per_step']:.1f}{ratio[0]} | "
                     f"{r['other_ops_per_step']:.1f} | {r['host_ms_per_step']:.2f} ms{ratio[1]} |")
    table = "\n".join(lines)
    print(f"Per time step of one batch (T={args.T}, forward, loss, backward, optimizer step / T), VGG-11 width "
          f"{args.width}, 2x{args.size}x{args.size}, batch {args.batch_size}, CPU, 1 thread; host time: median "
          f"of {args.rounds} interleaved rounds" + ("; ratios to SJ online SLTT" if base else "") + ":\n")
    print(table)
    write_json(os.path.abspath(args.out), {"config": vars(args), "rows": rows, "table_markdown": table,
                                           "torch": torch.__version__})
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
