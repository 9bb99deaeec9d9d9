"""Command line: ``snn-localrules demo`` (the main job) and ``snn-localrules bench
[memory|accuracy|tp-memory|all] [--quick] [--plot-only]`` (the benchmarks, from a source checkout)."""
from __future__ import annotations

import sys


USAGE = """usage: snn-localrules [demo|bench] [options]

  demo [--quick] ...    the main job: a SpikingJelly conv SNN on MNIST-5k (each image the input current of
                        every step), trained with BPTT and with online SLTT; held-out accuracy, peak memory
                        and time of each (the default command)
  bench [memory|accuracy|tp-memory|gpu|all] [--quick] [--plot-only]
                        the benchmarks (from a source checkout): JSON and PNG in benchmarks/results/

'snn-localrules demo --help' and 'snn-localrules bench --help' list each command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    if command == "bench":
        import importlib.util
        from pathlib import Path

        # benchmarks/__main__.py dispatches: memory (default) | accuracy | tp-memory | all, --plot-only
        script = Path(__file__).resolve().parent.parent / "benchmarks" / "__main__.py"
        if not script.exists():
            print("the benchmarks ship with the source tree, not the wheel: run this from a checkout "
                  "installed with pip install -e .", file=sys.stderr)
            return 2
        spec = importlib.util.spec_from_file_location("slr_benchmarks_cli", script)
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        return cli.main(argv)
    print(f"unknown command {command!r}; use 'demo' or 'bench'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
