"""One multi-step neuron layer alone: SpikingJelly's own forward and backward against the fused SLTT neuron.

The model benchmarks (``multistep.py``, ``gpu.py``) time whole networks, where the convolutions take most
of the time and the neuron's share is hidden in their noise. This one times the neuron layer by itself, so
what the fused function gains or loses is visible: for SpikingJelly's ``IFNode``, ``LIFNode`` and
``ParametricLIFNode`` (multi-step), with the SLTT authors' setting (soft reset, ``detach_reset``) and
SpikingJelly's default (hard reset to 0), per T:

* ``sj``    -- the neuron as SpikingJelly runs it (its default backend for the device: torch on CPU; on CUDA
  its own CUDA or Triton kernel), forward and BPTT backward.
* ``fused`` -- the same module after ``slr.wrap(layer, rule="sltt")`` (zero-change mode): forward and SLTT's
  elementwise backward (torch on CPU; on CUDA the CuPy kernels where the plugin uses them). Where the
  plugin steps the neuron instead (no fused form proven equal to this SpikingJelly's, or CUDA without
  ``SLR_FUSED_CUDA=1``), the row says "(stepped)".

Each round runs every variant once (interleaved, so a load change hits all alike); the table gives the
median time of forward + backward over the rounds, the ratio fused / sj, and the bytes autograd keeps for
backward (measured with saved-tensor hooks: the distinct storages saved by the forward, parameters left
out; the input counts where it is kept, since in a network it is a batch norm's or conv's output that
only the neuron would keep). The upstream gradient is fixed random values; every call starts from a reset membrane.

    python benchmarks/neuron_speed.py [--Ts 8 16] [--shape 32 64 16 16] [--rounds 15] [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "neuron_speed.json")
KINDS = ("IFNode", "LIFNode", "ParametricLIFNode")
SETTINGS = {
    "soft": dict(v_reset=None, detach_reset=True),  # the SLTT authors' setting
    "hard": dict(v_reset=0.0, detach_reset=False),  # SpikingJelly's defaults
}
VARIANTS = ("sj", "fused")


def build(kind: str, setting: str, device):
    from spikingjelly.activation_based import neuron, surrogate

    options = dict(step_mode="m", surrogate_function=surrogate.Sigmoid(), **SETTINGS[setting])
    if kind != "IFNode":
        options["decay_input"] = True
        options["tau" if kind == "LIFNode" else "init_tau"] = 2.0
    return getattr(neuron, kind)(**options).to(device)


def case(kind: str, setting: str, T: int, shape: List[int], device, seed: int):
    """The variants of one (neuron, setting, T), each a function running forward and backward once, and
    the parameters (there whatever the variant; the input counts where a variant keeps it: in a network
    it is a layer's output that only the neuron would keep)."""
    import torch
    from spikingjelly.activation_based import functional

    import snn_localrules as slr

    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, *shape, generator=generator) * 0.8 + 0.6).to(device).requires_grad_(True)
    grad = torch.randn(T, *shape, generator=generator).to(device)
    runs, kept = {}, []
    for variant in VARIANTS:
        module = build(kind, setting, device)
        kept += list(module.parameters())
        if variant == "fused":
            slr.wrap(torch.nn.Sequential(module), rule="sltt")

        def run(module=module, count=None):
            """Forward and backward once; ``count``: a context manager active during the forward only."""
            x.grad = None
            with count if count is not None else contextlib.nullcontext():
                out = module(x)
            out.backward(grad)
            functional.reset_net(module)
            return out

        runs[variant] = run
    return runs, kept


def saved_bytes(run: Callable[..., Any], exclude) -> int:
    """What autograd keeps for backward from one forward of ``run`` (not what its backward saves for a
    moment of its own, such as an autograd call of the surrogate)."""
    from snn_localrules.memory import SavedBytes

    counter = SavedBytes(exclude)
    run(count=counter)
    return counter.total


def measure(args) -> List[Dict[str, Any]]:
    import torch

    from snn_localrules.memory import storage_keys

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for T in args.Ts:
        for kind in KINDS:
            for setting in SETTINGS:
                runs, kept = case(kind, setting, T, args.shape, device, args.seed)
                for run in runs.values():  # warm-up (compiles kernels on CUDA)
                    run()
                times: Dict[str, List[float]] = {v: [] for v in runs}
                for _ in range(args.rounds):
                    for variant, run in runs.items():
                        sync()
                        start = time.perf_counter()
                        run()
                        sync()
                        times[variant].append(time.perf_counter() - start)
                # did the wrapped module take the fused node, or step its neuron (where the plugin has no
                # form proven equal to this SpikingJelly's, or on CUDA without SLR_FUSED_CUDA=1)?
                node = type(runs["fused"]().grad_fn).__name__
                path = "fused" if node.startswith("SLTTMultiStep") else "stepped"
                row: Dict[str, Any] = {"T": T, "neuron": kind, "setting": setting, "shape": list(args.shape),
                                       "fused_path": path}
                for variant, run in runs.items():
                    row[f"{variant}_ms"] = statistics.median(times[variant]) * 1e3
                    row[f"{variant}_saved_mb"] = saved_bytes(run, storage_keys(kept)) / 2 ** 20
                row["ratio"] = row["fused_ms"] / row["sj_ms"]
                rows.append(row)
                print(f"T={T:3d} {kind:18s} {setting}: sj {row['sj_ms']:.2f} ms, fused {row['fused_ms']:.2f} ms "
                      f"({row['ratio']:.2f})", flush=True)
    return rows


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| T | neuron | reset | SpikingJelly fwd+bwd | fused SLTT fwd+bwd | fused / SJ | kept for backward (SJ / fused) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        wrapped = f"{r['fused_ms']:.2f} ms" + ("" if r["fused_path"] == "fused" else " (stepped)")
        lines.append(f"| {r['T']} | {r['neuron']} | {r['setting']} | {r['sj_ms']:.2f} ms | {wrapped} | "
                     f"{r['ratio']:.2f} | {r['sj_saved_mb']:.2f} / {r['fused_saved_mb']:.2f} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--Ts", type=int, nargs="+", default=[8, 16])
    p.add_argument("--shape", type=int, nargs="+", default=[32, 64, 16, 16], help="one step's shape (B, C, H, W)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (every variant once per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    import torch

    import snn_localrules as slr

    rows = measure(args)
    table = markdown(rows)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    sys.path.insert(0, HERE)
    from plotting import write_json
    from gpu import sj_lif_implementation  # which LIF kernel SpikingJelly bound (after the runs)

    sj_lif = sj_lif_implementation(torch.device(args.device))
    print(f"\nDevice: {device}; one step of input {args.shape}; median of {args.rounds} interleaved rounds; "
          f"SpikingJelly's LIF implementation: {sj_lif.get('active')}\n")
    print(table)
    write_json(args.out, {
        "config": {**vars(args), "device_name": device, "torch": torch.__version__,
                   "snn_localrules": slr.__version__, "sj_lif_implementation": sj_lif},
        "rows": rows, "table_markdown": table})
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
