"""Online SLTT and TP under torch.distributed, and SLTT under mixed precision: what one batch costs.

Distributed (2 CPU processes, gloo): time per batch and all-reduce calls / bytes per batch of online SLTT on a
DistributedDataParallel model, with this plugin's once-per-batch synchronisation (``no_sync`` on all but
the last backward) against synchronising after every step's backward (what a naive per-step loop does),
and the single-process time on the whole batch beside them. TP on the same DDP model: all-reduces per
batch (one per time step: TP steps the optimizer at every step) and the all-gather volume of its global
contrast (each layer's label-path traces, every step) against contrasting within each process's batch.

Mixed precision (one process each, fresh): time per batch and peak memory growth of online SLTT in fp32
and under bfloat16 autocast (CPU), on the same VGG-like model as ``memory_vs_T.py``.

    python benchmarks/distributed_amp.py [--quick] [--T 8] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plotting  # noqa: E402  (benchmarks/ is a folder of scripts; this sits beside them)

DEFAULT_OUT = os.path.join(HERE, "results", "distributed_amp.json")
RESULT_TAG = "RESULT "


def _model():
    from memory_vs_T import build_model  # the same VGG-like SNN as the memory table

    return build_model(sltt_nodes=False, tau=2.0)


def _batch(T: int, B: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, 2, 32, 32, generator=g) < 0.2).float(), torch.randint(0, 10, (B,), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- distributed -------------------------------------------------------------------------------------
#: distributed configurations: (rule, learner options, whether DDP's no_sync is visible to the learner)
DISTRIBUTED_MODES = {
    "sltt-once": ("sltt", {}, True),
    "sltt-every-step": ("sltt", {}, False),
    "tp-global": ("tp", {"global_contrast": None}, True),
    "tp-local": ("tp", {"global_contrast": False}, True),
}


def _learner(model, rule: str, options: Dict):
    import torch

    import snn_localrules as slr

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # this table measures cost, not learning: a deep layer of the untrained VGG that stays silent is expected
    warnings.filterwarnings("ignore", message="TP: hidden layer")
    if rule == "tp":
        return slr.wrap(model, rule="tp", optimizer=optimizer, num_classes=10, **options)
    return slr.wrap(model, rule="sltt", optimizer=optimizer, **options)


def _ddp_worker(rank: int, world: int, port: int, args, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from spikingjelly.activation_based import functional
    from torch.nn.parallel import DistributedDataParallel as DDP

    from snn_localrules import distributed

    torch.set_num_threads(1)
    rule, options, defer = DISTRIBUTED_MODES[mode]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = _model()
    functional.set_step_mode(net, "m")

    class SyncEveryStep(DDP):
        no_sync = None  # hides DDP's no_sync from the learner: every backward all-reduces

    model = (DDP if defer else SyncEveryStep)(net)
    calls: List[int] = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.buffer().numel() * bucket.buffer().element_size())
        tensor = bucket.buffer().div_(world)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_allreduce)
    gathered: List[int] = []
    gather_rows = distributed.gather_rows

    def counting_gather(tensor, group, sizes):
        gathered.append(max(sizes) * len(sizes) * tensor[:1].numel() * tensor.element_size())
        return gather_rows(tensor, group, sizes)

    distributed.gather_rows = counting_gather
    learner = _learner(model, rule, options)
    x, y = _batch(args.T, args.batch_size)
    half = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    times = []
    for index in range(1 + args.batches):
        dist.barrier()
        start = time.perf_counter()
        learner.step(x[:, half], y[half])
        if index:
            times.append(time.perf_counter() - start)
    batches = 1 + args.batches
    if rank == 0:
        plotting.write_json(out, {"s_per_batch": statistics.median(times), "allreduce_calls": len(calls) / batches,
                                  "allreduce_mb": sum(calls) / batches / 2 ** 20,
                                  "allgather_mb": sum(gathered) / batches / 2 ** 20})
    dist.barrier()
    dist.destroy_process_group()
    # the result is written: skip the interpreter's teardown, where torch's gloo threads rarely abort the
    # process (SIGABRT, "terminate called without an active exception"; tests/test_production.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(args, mode: str) -> Dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.spawn(_ddp_worker, args=(2, _free_port(), args, mode, out), nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def run_single(args, rule: str) -> Dict:
    import torch
    from spikingjelly.activation_based import functional

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = _model()
    functional.set_step_mode(net, "m")
    learner = _learner(net, rule, {})
    x, y = _batch(args.T, args.batch_size)
    times = []
    for index in range(1 + args.batches):
        start = time.perf_counter()
        learner.step(x, y)
        if index:
            times.append(time.perf_counter() - start)
    return {"s_per_batch": statistics.median(times), "allreduce_calls": 0, "allreduce_mb": 0.0, "allgather_mb": 0.0}


# -- mixed precision (fresh process per configuration) ------------------------------------------------
def amp_worker(args) -> Dict:
    import gc

    import torch
    from spikingjelly.activation_based import functional

    import snn_localrules as slr

    torch.set_num_threads(2)
    torch.manual_seed(0)
    slr.plugin_manager()
    net = _model()
    functional.set_step_mode(net, "m")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = _batch(args.T, args.batch_size)
    gc.collect()
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    autocast = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    learner = slr.wrap(net, rule="sltt", optimizer=optimizer, autocast=autocast)
    times, losses = [], []
    for index in range(1 + args.batches):
        start = time.perf_counter()
        losses.append(learner.step(x, y).loss)
        if index:
            times.append(time.perf_counter() - start)
    from memory_vs_T import peak_rss_bytes  # VmHWM: not polluted by a large parent's peak

    peak = peak_rss_bytes()
    return {"precision": args.precision, "s_per_batch": statistics.median(times),
            "peak_growth_mb": (peak - baseline) / 2 ** 20, "losses": losses}


def run_amp(args, precision: str) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--amp-worker", "--precision", precision,
               "--T", str(args.T), "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # peak RSS follows live memory
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"amp worker failed: {proc.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T=4, batch 8, 1 timed batch")
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--amp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.batch_size, args.batches = 4, 8, 1
    if args.amp_worker:
        print(RESULT_TAG + json.dumps(amp_worker(args)), flush=True)
        return 0

    results = {
        "SLTT, single process, whole batch": run_single(args, "sltt"),
        "SLTT, 2 processes, sync once per batch (ours)": run_distributed(args, "sltt-once"),
        "SLTT, 2 processes, sync after every step": run_distributed(args, "sltt-every-step"),
        "TP, single process, whole batch": run_single(args, "tp"),
        "TP, 2 processes, global contrast (default)": run_distributed(args, "tp-global"),
        "TP, 2 processes, contrast within each process": run_distributed(args, "tp-local"),
    }
    amp = {precision: run_amp(args, precision) for precision in ("fp32", "bf16")}
    print(f"VGG-like SNN (memory_vs_T.py's), T={args.T}, batch {args.batch_size} (split over the "
          "processes), gloo on CPU, 1 thread per process")
    print("| configuration | s / batch | all-reduce calls / batch | MB all-reduced / batch | MB all-gathered / batch |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s_per_batch']:.3f} | {r['allreduce_calls']:.0f} | {r['allreduce_mb']:.1f} "
              f"| {r['allgather_mb']:.2f} |")
    print()
    print("| precision (CPU autocast) | s / batch | peak memory growth |")
    print("|---|---|---|")
    for name, r in amp.items():
        print(f"| {name} | {r['s_per_batch']:.3f} | {r['peak_growth_mb']:.1f} MB |")
    plotting.write_json(args.out, {"args": vars(args), "distributed": results, "amp": amp})
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
