"""One command for the benchmarks, each writing JSON and a PNG plot into ``benchmarks/results/``.

    python -m benchmarks [memory|accuracy|tp-memory|gpu|all] [--quick] [--plot-only] [--results-dir DIR] [options]
    snn-localrules bench  ...the same...

* ``memory`` (default): peak memory and time per batch against T; BPTT, SpikingJelly's online SLTT,
  SpikingJelly's memopt, this plugin's SLTT and SLTT-2 (``memory_vs_T.py``, 10-20 min on 2 CPU cores).
* ``accuracy``: held-out accuracy, peak memory and time of BPTT, SLTT, SLTT-K and TP per model
  (``accuracy.py``, 10-20 min).
* ``tp-memory``: TP's peak memory against T and the number of classes, BPTT beside it (``tp_memory.py``).
* ``gpu``: peak GPU memory and time per batch of SpikingJelly's BPTT, memopt and online SLTT against this
  plugin's online SLTT (chunks 1, 2, 5, auto), SLTT-2 and zero-change mode (``gpu.py``; for a GPU).
* ``all``: memory, accuracy and tp-memory, one after the other (not gpu).

``--quick`` runs smoke-sized versions that write to ``benchmarks/results/quick/`` (the full results stay
as they are); ``--plot-only`` redraws the PNGs from the existing JSON without running anything. Options
after a single benchmark's name go to that benchmark (``python -m benchmarks memory --Ts 2,4,8``; its
``--help`` lists them).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> (script, JSON stem, one-line description)
BENCHMARKS: Dict[str, Tuple[str, str, str]] = {
    "memory": ("memory_vs_T.py", "memory_vs_T",
               "peak memory and time vs T: BPTT, SpikingJelly online SLTT, memopt, SLTT, SLTT-2"),
    "accuracy": ("accuracy.py", "accuracy", "accuracy, peak memory and time per rule per model"),
    "tp-memory": ("tp_memory.py", "tp_memory", "TP peak memory vs T and vs classes, BPTT beside it"),
    "gpu": ("gpu.py", "gpu", "GPU memory and time: SpikingJelly BPTT/memopt/online SLTT vs SLTT chunks, SLTT-2, "
                             "zero-change (not in 'all')"),
}
DEFAULT = "memory"
ALL = ("memory", "accuracy", "tp-memory")  # gpu.py is sized for a GPU: run it by name


def load_script(name: str):
    """Import a benchmark script by path (``benchmarks/`` is a directory of scripts, not a package) under
    its own module name, which is also how the scripts import each other."""
    script, stem, _ = BENCHMARKS[name]
    if stem in sys.modules:
        return sys.modules[stem]
    spec = importlib.util.spec_from_file_location(stem, os.path.join(HERE, script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snn-localrules bench",
        description="Run a benchmark (JSON + PNG into benchmarks/results/): "
                    + "; ".join(f"{n}: {d}" for n, (_, _, d) in BENCHMARKS.items()),
        usage="%(prog)s [{" + ",".join(BENCHMARKS) + ",all}] [--quick] [--plot-only] [--results-dir DIR] "
              "[benchmark options]",
        add_help=False,
        allow_abbrev=False,  # a prefix of a benchmark's own option must reach that benchmark
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke-sized runs; results go to benchmarks/results/quick/ unless --results-dir is given")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNGs from the existing JSON (benchmarks/results/ or --results-dir); run nothing")
    p.add_argument("--results-dir", default=None, metavar="DIR",
                   help="read/write <dir>/<benchmark>.json and .png instead of the defaults")
    p.add_argument("-h", "--help", action="store_true", help="this help; after a benchmark's name, its own help")
    return p


def plan(argv: List[str]) -> Tuple[List[Tuple[str, List[str]]], Optional[str]]:
    """Turn the command line into ``[(benchmark, argv for its script)]``, or an error message.

    The first word names the benchmark (or ``all``); dispatcher options may come anywhere; every other
    option is passed to the named benchmark unchanged (refused for ``all``, where it would be ambiguous).
    """
    argv = list(argv)
    named = bool(argv) and not argv[0].startswith("-")
    selection = argv.pop(0) if named else DEFAULT
    if selection not in BENCHMARKS and selection != "all":
        return [], (f"unknown benchmark {selection!r}; choose one of {', '.join(BENCHMARKS)} or all "
                    f"(default {DEFAULT})")
    options, rest = parser().parse_known_args(argv)
    if options.help:
        if named and selection != "all":
            return [(selection, ["--help"])], None
        return [], "help"
    names = list(ALL) if selection == "all" else [selection]
    if rest and selection == "all":
        return [], (f"options {' '.join(rest)} would go to every benchmark; with 'all' only --quick, "
                    "--plot-only and --results-dir are accepted (name one benchmark to pass its options)")
    runs = []
    for name in names:
        script_argv = []
        if options.results_dir:
            script_argv += ["--out", os.path.join(os.path.abspath(options.results_dir), BENCHMARKS[name][1] + ".json")]
        if options.quick:
            script_argv.append("--quick")
        if options.plot_only:
            script_argv.append("--plot-only")
        runs.append((name, script_argv + rest))  # the user's own --out (after ours) wins
    return runs, None


def main(argv: Optional[List[str]] = None) -> int:
    runs, error = plan(sys.argv[1:] if argv is None else argv)
    if error == "help":
        parser().print_help()
        return 0
    if error:
        print(f"snn-localrules bench: {error}", file=sys.stderr)
        return 2
    worst = 0
    for index, (name, script_argv) in enumerate(runs):
        if len(runs) > 1:
            print(f"\n=== [{index + 1}/{len(runs)}] {name}: {BENCHMARKS[name][2]} ===", flush=True)
        program, sys.argv[0] = sys.argv[0], f"snn-localrules bench {name}"  # what argparse's usage lines name
        try:
            code = load_script(name).main(script_argv)
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        finally:
            sys.argv[0] = program
        worst = max(worst, int(code or 0))
    return worst


if __name__ == "__main__":
    sys.exit(main())
