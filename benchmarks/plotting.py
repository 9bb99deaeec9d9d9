"""What the benchmark scripts share: writing their JSON, matplotlib (optional) and the --plot-only path."""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict

NO_MATPLOTLIB = "matplotlib is not installed: plot skipped (pip install snn-localrules[examples])."


def write_json(path: str, payload: Dict, indent: int = 2) -> None:
    """Write ``payload`` to ``path`` (its folder made if missing) through a temporary file, so that a kill
    mid-write leaves the old file whole."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=indent)
    os.replace(path + ".tmp", path)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: str) -> str:
    """Lay out, write (PNG, 120 dpi) and close ``fig``; the message the benchmark prints."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def plot_only(out: str, plot: Callable[[Dict, str], str], name: str) -> int:
    """Redraw the PNG next to the JSON ``out`` with ``plot(payload, png_path)``; run nothing.

    :param name: the benchmark's name for ``snn-localrules bench <name>``, for the message when the JSON
        is missing.
    :return: 0 when the plot was written, 1 when it could not be (no matplotlib), 2 without JSON.
    """
    if not os.path.exists(out):
        print(f"no results at {out}: run the benchmark first (snn-localrules bench {name}; --quick for a smoke "
              "run), or pass --out with an existing JSON.", file=sys.stderr)
        return 2
    with open(out) as f:
        message = plot(json.load(f), os.path.splitext(out)[0] + ".png")
    print(message)
    return 0 if message.startswith("plot written") else 1
