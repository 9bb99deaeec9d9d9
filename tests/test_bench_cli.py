"""``snn-localrules bench`` / ``python -m benchmarks``: argument handling and the --plot-only path.

Nothing here runs a benchmark: the dispatcher's plan is checked directly, and --plot-only redraws from
small JSON files written in each benchmark's format (and from copies of the committed results).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snn_localrules.__main__ import main as slr_main

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEMS = {"memory": "memory_vs_T", "accuracy": "accuracy", "tp-memory": "tp_memory"}


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def dispatcher():
    spec = importlib.util.spec_from_file_location("bench_dispatcher_under_test", BENCH / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_results(directory: Path) -> None:
    """One JSON per benchmark in the format the scripts write, each with one failed configuration."""
    memory = {
        "config": {"Ts": [2, 4, 8], "methods": ["bptt", "sj_online", "memopt", "sltt", "sltt_k2"]},
        "results": [
            {"method": m, "T": T, "peak_growth_mb": base + slope * T, "s_per_batch": 0.1 * T, "error": None}
            for m, base, slope in (("bptt", 100, 20), ("sj_online", 110, 0.1), ("memopt", 100, 15),
                                   ("sltt", 108, 0.0), ("sltt_k2", 109, 0.2))
            for T in (2, 4, 8)
        ] + [{"method": "memopt", "T": 16, "error": "RuntimeError: boom"}],
    }
    accuracy = {
        "args": {"K": 2, "width": 0.125},
        "results": [
            {"model": model, "rule": rule, "accuracy": acc, "peak_growth_mb": mb, "s_per_batch": 0.1,
             "train": 400, "test": 100, "T": 10, "epochs": 1}
            for model, rule, acc, mb in (("mlp", "bptt", 0.9, 42), ("mlp", "sltt", 0.88, 42),
                                         ("mlp", "sltt_k", 0.8, 42), ("mlp", "tp", 0.7, 42),
                                         ("vgg9", "bptt", 0.5, 585), ("vgg9", "sltt", 0.45, 31))
        ] + [{"model": "vgg9", "rule": "tp", "error": ["RuntimeError: boom"]}],
    }
    tp = {
        "args": {"width": 0.25, "batch_size": 16},
        "results": [
            {"method": m, "T": T, "classes": c, "peak_growth_mb": 90.0 if m == "tp" else 20.0 * T,
             "s_per_batch": 0.3 * T}
            for m in ("tp", "bptt") for T, c in ((2, 10), (8, 10), (8, 100))
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, payload in (("memory_vs_T", memory), ("accuracy", accuracy), ("tp_memory", tp)):
        (directory / f"{stem}.json").write_text(json.dumps(payload))


# ---------------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------------
def test_default_is_memory_and_options_pass_through(dispatcher):
    assert dispatcher.plan([]) == ([("memory", [])], None)
    assert dispatcher.plan(["--quick"]) == ([("memory", ["--quick"])], None)
    runs, error = dispatcher.plan(["memory", "--Ts", "2,4", "--idle-wait", "0"])
    assert error is None and runs == [("memory", ["--Ts", "2,4", "--idle-wait", "0"])]
    runs, error = dispatcher.plan(["accuracy", "--plot-only", "--quick"])
    assert error is None and runs == [("accuracy", ["--quick", "--plot-only"])]


def test_all_runs_every_benchmark_with_its_own_results_file(dispatcher, tmp_path):
    runs, error = dispatcher.plan(["all", "--plot-only", "--results-dir", str(tmp_path)])
    assert error is None
    assert [name for name, _ in runs] == ["memory", "accuracy", "tp-memory"]
    for name, argv in runs:
        assert argv == ["--out", str(tmp_path / f"{STEMS[name]}.json"), "--plot-only"]


def test_a_users_out_wins_over_results_dir(dispatcher, tmp_path):
    runs, _ = dispatcher.plan(["tp-memory", "--results-dir", str(tmp_path), "--out", "mine.json"])
    argv = runs[0][1]
    assert argv[-2:] == ["--out", "mine.json"]  # argparse keeps the last --out


def test_bad_selections_are_refused_with_the_choices(dispatcher, capsys):
    runs, error = dispatcher.plan(["bogus"])
    assert runs == [] and "memory" in error and "tp-memory" in error and "all" in error
    runs, error = dispatcher.plan(["all", "--Ts", "2"])
    assert runs == [] and "--Ts 2" in error
    # abbreviations are not taken for the dispatcher's own options: they belong to the benchmark
    runs, error = dispatcher.plan(["memory", "--plot"])
    assert error is None and runs == [("memory", ["--plot"])]
    assert slr_main(["bench", "bogus"]) == 2
    assert "unknown benchmark 'bogus'" in capsys.readouterr().err


def test_help_lists_the_benchmarks(capsys):
    assert slr_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("memory", "accuracy", "tp-memory", "all", "--plot-only", "--quick"):
        assert name in out


# ---------------------------------------------------------------------------------------------------
# --plot-only
# ---------------------------------------------------------------------------------------------------
def test_plot_only_redraws_every_png_without_running(tmp_path, capsys):
    fake_results(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    code = slr_main(["bench", "all", "--plot-only", "--results-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == before  # JSON untouched
    assert not list(tmp_path.glob("quick"))
    if not has_matplotlib():
        assert code == 1 and "pip install snn-localrules[examples]" in out.out
        return
    assert code == 0, out.err
    for stem in STEMS.values():
        png = tmp_path / f"{stem}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, stem
        assert str(png) in out.out


def test_plot_only_names_the_missing_json_and_the_command(tmp_path, capsys):
    for name, stem in STEMS.items():
        assert slr_main(["bench", name, "--plot-only", "--results-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / f"{stem}.json") in err and f"snn-localrules bench {name}" in err
        assert not (tmp_path / f"{stem}.png").exists()


def test_quick_runs_write_beside_not_over_the_full_results(capsys):
    """--quick defaults to benchmarks/results/quick/: a smoke run cannot overwrite the committed JSON."""
    for name, stem in STEMS.items():
        slr_main(["bench", name, "--quick", "--plot-only"])  # redraws if a quick run exists, else says so
        captured = capsys.readouterr()
        assert str(BENCH / "results" / "quick" / f"{stem}.json")[:-5] in captured.out + captured.err


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib not installed")
def test_committed_results_redraw(tmp_path):
    """The JSON files in benchmarks/results/ (the README's tables) are in the format the plots read."""
    committed = sorted((BENCH / "results").glob("*.json"))
    wanted = [BENCH / "results" / f"{stem}.json" for stem in STEMS.values()]
    present = [p for p in wanted if p in committed]
    if not present:
        pytest.skip("no committed benchmark results")
    for p in present:
        shutil.copy(p, tmp_path / p.name)
    names = [n for n, s in STEMS.items() if (tmp_path / f"{s}.json").exists()]
    for name in names:
        assert slr_main(["bench", name, "--plot-only", "--results-dir", str(tmp_path)]) == 0
        assert (tmp_path / f"{STEMS[name]}.png").read_bytes()[:8] == PNG_MAGIC


def test_python_dash_m_benchmarks_from_the_repository_root(tmp_path):
    fake_results(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "tp-memory", "--plot-only", "--results-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == (0 if has_matplotlib() else 1), proc.stderr
    if has_matplotlib():
        assert (tmp_path / "tp_memory.png").read_bytes()[:8] == PNG_MAGIC


def _multistep():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("multistep_bench", BENCH / "multistep.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_multistep_benchmark_options_and_one_worker():
    """benchmarks/multistep.py: a --quick run writes under results/quick/ (it overwrote the full results),
    CUDA-only methods are refused on the CPU, and one worker measures a batch."""
    pytest.importorskip("spikingjelly")
    multistep = _multistep()
    assert multistep.parse_args(["--quick"]).out == multistep.QUICK_OUT != multistep.DEFAULT_OUT
    assert multistep.parse_args([]).out == multistep.DEFAULT_OUT
    with pytest.raises(SystemExit):
        multistep.parse_args(["--methods", "bptt,bptt_torch"])
    devices = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])
    for device in devices:
        args = multistep.parse_args(["--worker", "--method", "bptt", "--T", "2", "--batch-size", "2", "--batches", "1",
                                     "--warmup", "0", "--threads", "1", "--device", device])
        result = multistep.run_worker(args)
        assert result["error"] is None and result["device"].startswith(device) and result["peak_growth_mb"] > 0
        assert result["memory_kind"] == ("cuda_max_allocated" if device == "cuda" else "peak_rss")


def test_list_options_take_commas_or_spaces_and_usage_names_the_command(dispatcher, capsys):
    """`bench memory --Ts 4 8` was refused ("unrecognized arguments") and `bench gpu --Ts 4,8` too ("invalid
    int value"): both spellings work in both; a benchmark's usage line says `snn-localrules bench <name>`
    (it said __main__.py)."""
    pytest.importorskip("spikingjelly")
    memory = dispatcher.load_script("memory")
    for argv in (["--Ts", "4", "8"], ["--Ts", "4,8"], ["--Ts", "4,", "8"]):
        assert memory.parse_args(argv + ["--methods", "bptt,", "sltt"]).Ts == "4,8"
    assert memory.parse_args(["--methods", "bptt, sltt"]).methods == "bptt,sltt"
    gpu = dispatcher.load_script("gpu")
    for argv in (["--Ts", "4", "8"], ["--Ts", "4,8"], ["--Ts", "4, 8"]):
        args = gpu.parse_args(argv + ["--batches", "2,3", "--methods", "sj_bptt, sltt_c1", "--device", "cpu"])
        assert (args.Ts, args.batches, args.methods) == ([4, 8], [2, 3], ["sj_bptt", "sltt_c1"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--methods", "nonsense", "--device", "cpu"])
    assert dispatcher.main(["memory", "--Ts"]) == 2
    assert "usage: snn-localrules bench memory" in capsys.readouterr().err
