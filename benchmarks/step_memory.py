"""What one online step keeps for backward: SpikingJelly's own online SLTT against this plugin's.

Online SLTT backpropagates every time step as soon as it is computed, so its activation memory is what one
step's forward keeps for that step's backward. This script counts those bytes (the distinct storages
autograd saves, parameters, buffers and the input left out; :class:`snn_localrules.memory.SavedBytes`,
which counts spikes as this plugin's packer keeps them) for the VGG-11-like network of ``gpu.py``
(2x48x48 input) at the batch sizes of its grid:

* ``sj_online``  -- SpikingJelly's ``SLTTLIFNode`` model, one single-step call and its cross-entropy loss
  (what ``ottt_online_training`` runs per step).
* ``sltt``       -- this plugin's online SLTT on the same network with SpikingJelly's ``LIFNode``
  (``slr.wrap(model, rule="sltt", optimizer=opt)``, defaults: packed spikes, no membrane for
  batch-norm-fed neurons), as ``learner.step`` measures it for ``chunk="auto"`` (``learner.step_bytes``).
* ``sltt_plain`` -- the same with ``pack_spikes=False, recompute_membrane=False``.

These are counts of tensors, the same on any device; they are not a peak (a GPU's peak adds the
gradients, the optimizer state and the backward's temporaries: ``gpu.py`` measures that on a GPU). On CPU
the forward and backward of one step at B=128 take a few seconds.

    python benchmarks/step_memory.py [--batches 32 128] [--width 1.0] [--size 48]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "step_memory.json")
MB = 2 ** 20


def sj_online_bytes(x, y, width: float) -> int:
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    from gpu import build_vgg11
    from snn_localrules.memory import SavedBytes, storage_keys

    torch.manual_seed(0)
    model = build_vgg11(width, "avg", 2.0, sltt_nodes=True)
    with SavedBytes(storage_keys([x, *model.parameters(), *model.buffers()])) as counter:
        loss = F.cross_entropy(model(x[0]), y)  # the step's loss, as both drivers compute it
    del loss
    functional.reset_net(model)
    return counter.total


def plugin_bytes(x, y, width: float, **options: Any) -> int:
    import torch
    from spikingjelly.activation_based import functional

    import snn_localrules as slr
    from gpu import build_vgg11

    torch.manual_seed(0)
    model = build_vgg11(width, "avg", 2.0)
    functional.set_step_mode(model, "m")
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="ce",
                       chunk="auto", max_memory=1 << 50, **options)
    try:
        learner.step(x, y)  # one step: measured as chunk="auto" measures it
        return int(learner.step_bytes)
    finally:
        learner.unwrap()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of gpu.py's VGG-11")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    import torch

    from gpu import CLASSES, IN_CHANNELS, SPIKE_PROB
    from plotting import write_json

    torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    for B in args.batches:
        generator = torch.Generator().manual_seed(1)
        x = (torch.rand(1, B, IN_CHANNELS, args.size, args.size, generator=generator) < SPIKE_PROB).float()
        y = torch.randint(0, CLASSES, (B,), generator=generator)
        row = {"batch_size": B, "sj_online": sj_online_bytes(x, y, args.width), "sltt": plugin_bytes(x, y, args.width),
               "sltt_plain": plugin_bytes(x, y, args.width, pack_spikes=False, recompute_membrane=False)}
        rows.append(row)
        print(f"B={B}: " + ", ".join(f"{k} {row[k] / MB:.1f} MB" for k in ("sj_online", "sltt", "sltt_plain")),
              flush=True)
    lines = ["| B | SJ online SLTT | this plugin's online SLTT (default) | the same without packing/rebuild |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['sj_online'] / MB:.1f} MB | {r['sltt'] / MB:.1f} MB "
                     f"({r['sltt'] / r['sj_online']:.2f}) | {r['sltt_plain'] / MB:.1f} MB "
                     f"({r['sltt_plain'] / r['sj_online']:.2f}) |")
    table = "\n".join(lines)
    print(f"\nBytes kept for one step's backward, VGG-11 width {args.width}, 2x{args.size}x{args.size} "
          f"(ratios to SpikingJelly's online SLTT):\n")
    print(table)
    write_json(os.path.abspath(args.out), {"config": vars(args), "rows": rows, "table_markdown": table})
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
