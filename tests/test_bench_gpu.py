"""``benchmarks/gpu.py``: a CPU smoke run end to end, and its target checks and profile split on made-up data.

The smoke run is real (fresh worker processes, SpikingJelly and this plugin at smoke size); its timings on
this shared CPU mean nothing and are not checked beyond being finite and positive.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
SMOKE_METHODS = ["sj_bptt", "sj_online", "sltt_c1", "sltt_fused"]


def _has_sj_online_sltt() -> bool:
    try:
        from spikingjelly.activation_based import neuron
    except ImportError:
        return False
    return hasattr(neuron, "SLTTLIFNode")


# the benchmarks compare against SpikingJelly 2.x's own online SLTT (its SLTTLIFNode; 0.0.0.0.14 has none)
needs_sj_online = pytest.mark.skipif(not _has_sj_online_sltt(), reason="needs SpikingJelly 2.x's SLTTLIFNode")


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu.json"
    proc = subprocess.run(
        ["nice", "-n", "10", sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out),
         "--methods", *SMOKE_METHODS],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    return proc, out


@needs_sj_online
def test_quick_cpu_run_fills_every_requested_cell(smoke, gpu):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    config = payload["config"]
    assert config["Ts"] == [4] and config["batches"] == [4] and config["methods"] == SMOKE_METHODS
    assert config["device"] == "cpu" and config["versions"]["torch"] and config["versions"]["spikingjelly"]
    assert set(config["method_settings"]) == set(SMOKE_METHODS)
    cells = {(r["method"], r["T"], r["batch_size"]): r for r in payload["results"]}
    assert set(cells) == {(m, 4, 4) for m in SMOKE_METHODS}
    for key, r in cells.items():
        assert r["status"] == "ok", (key, r.get("reason"))
        assert math.isfinite(r["s_per_batch"]) and r["s_per_batch"] > 0, key
        assert math.isfinite(r["peak_growth_mb"]) and r["peak_growth_mb"] >= 0, key
        assert r["memory_kind"] == "peak_rss" and len(r["times_s"]) == 1
        assert all(math.isfinite(v) for v in r["losses"])
    # the LIF implementation SpikingJelly ran is recorded (the torch reference on CPU)
    assert cells[("sj_bptt", 4, 4)]["sj_lif"]["implementation"]
    assert cells[("sltt_c1", 4, 4)]["sltt_neuron_path"]
    # the printed table has a row per method with the cell's figures, and the target list
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for m in SMOKE_METHODS:
        label = gpu.METHOD_LABELS[m]
        assert label in rows, (label, proc.stdout)
        assert f"{cells[(m, 4, 4)]['s_per_batch']:.3f} s" in rows[label]
    assert "| method | T=4, B=4 |" in proc.stdout
    assert "sltt_c1 / sj_online memory, T=4, B=4" in proc.stdout
    assert "peak RSS growth" in proc.stdout


@needs_sj_online
def test_plot_only_redraws_from_the_smoke_json(smoke, gpu):
    proc, out = smoke
    assert proc.returncode == 0
    png = out.with_suffix(".png")
    png.unlink(missing_ok=True)
    code = gpu.main(["--plot-only", "--out", str(out)])
    if gpu.plotting.pyplot() is None:
        assert code == 1
        return
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_sj_online
def test_in_process_cells_train_exactly_as_fresh_workers_do(smoke, gpu, tmp_path):
    # --in-process runs the cells one after another in one interpreter: each must start from the same
    # weights and train the same batches as in its own process (nothing of an earlier cell leaks into it;
    # the fused-call counter is put back), and on CPU, where a process's peak cannot be reset, it reports
    # no memory figure instead of a wrong one
    proc, fresh_out = smoke
    assert proc.returncode == 0
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        ["nice", "-n", "10", sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out),
         "--in-process", "--timed", "1", "--methods", *SMOKE_METHODS],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["config"]["in_process"] is True
    fresh = {(r["method"], r["T"], r["batch_size"]): r for r in json.loads(fresh_out.read_text())["results"]}
    cells = {(r["method"], r["T"], r["batch_size"]): r for r in payload["results"]}
    assert set(cells) == set(fresh)
    for key, r in cells.items():
        assert r["status"] == "ok" and r["in_process"] is True, (key, r.get("reason"))
        assert r["peak_growth_mb"] is None and math.isfinite(r["s_per_batch"])
        assert r["losses"] == fresh[key]["losses"], key
        assert r.get("sltt_neuron_path") == fresh[key].get("sltt_neuron_path"), key
    assert "sltt_fused" in run.stdout


def _cell(mem, sec, status="ok"):
    return {"status": status, "peak_growth_mb": mem if status == "ok" else None,
            "s_per_batch": sec if status == "ok" else None}


def test_target_checks_on_made_up_results(gpu):
    # SJ BPTT: 1000 MB, 1.0 s at every (T, B); SJ online SLTT 200 MB
    results = {}
    for T in (10, 20):
        for B in (32, 128):
            results[("sj_bptt", T, B)] = _cell(1000.0, 1.0)
            results[("sj_online", T, B)] = _cell(200.0, 3.0)
            results[("sltt_c1", T, B)] = _cell(140.0, 1.5)       # 0.70 of sj_online; 1.5x BPTT's time
            results[("sltt_c2", T, B)] = _cell(300.0, 1.2)       # memory 0.30 (> 0.25), time 1.2 (<= 1.3)
            results[("sltt_k2", T, B)] = _cell(150.0, 0.4)
            results[("sltt_fused", T, B)] = _cell(790.0, 1.01)   # memory met, time missed (just)
    results[("sltt_fused", 20, 128)] = _cell(None, None, status="OOM")
    checks = {c["name"]: c for c in gpu.compute_checks(results, [10, 20], [32, 128])}

    assert checks["sltt_c1 / sj_bptt time, T=10, B=32"]["ok"] is True       # 1.5 <= 2.0 at B=32
    assert checks["sltt_c1 / sj_bptt time, T=10, B=128"]["ok"] is False     # 1.5 >  1.0 at B=128
    assert "sltt_c1 / sj_bptt time, T=10, B=32 (stands in" not in " ".join(checks)
    assert checks["sltt_c1 / sj_online memory, T=20, B=128"]["value"] == pytest.approx(0.7)
    assert checks["sltt_c1 / sj_online memory, T=20, B=128"]["ok"] is True
    assert checks["sltt_c2 / sj_bptt time, T=10, B=32"]["ok"] is True
    assert checks["sltt_c2 / sj_bptt memory, T=10, B=32"]["ok"] is False
    assert checks["sltt_k2 / sj_bptt time, T=20, B=128"]["ok"] is True
    assert "sltt_k2 / sj_bptt time, T=20, B=32" not in checks                # stated for B=128 only
    assert checks["sltt_fused / sj_bptt memory, T=10, B=32"]["ok"] is True
    assert checks["sltt_fused / sj_bptt time, T=10, B=32"]["ok"] is False
    oom = checks["sltt_fused / sj_bptt time, T=20, B=128"]
    assert oom["value"] is None and oom["ok"] is None                        # an OOM cell: n/a, not met

    text = gpu.format_checks(list(checks.values()))
    assert "met" in text and "missed" in text and "n/a" in text
    table = gpu.markdown_table(results, [10, 20], [32, 128], ["sj_bptt", "sltt_c1", "sltt_fused"])
    assert "OOM" in table and "140 MB, 1.500 s (0.14x, 1.50x)" in table

    # one batch size only (--quick): the B=32 and B=128 targets both fall on it and say so
    small = {k: v for k, v in results.items() if k[1] == 10 and k[2] == 32}
    names = [c["name"] for c in gpu.compute_checks(small, [10], [32])]
    assert "sltt_c1 / sj_bptt time, T=10, B=32" in names
    assert "sltt_c1 / sj_bptt time, T=10, B=32 (stands in for B=128)" in names


def test_profile_split_counts_overlapping_kernels_once(gpu):
    from torch.autograd import DeviceType

    def event(name, device, self_us=0.0, start=0.0, end=0.0):
        return SimpleNamespace(name=name, device_type=device, self_cpu_time_total=self_us, is_async=False,
                               time_range=SimpleNamespace(start=start, end=end), is_user_annotation=False)

    events = [
        event("aten::conv2d", DeviceType.CPU, self_us=300.0),
        event("cudaLaunchKernel", DeviceType.CPU, self_us=100.0),
        event("cudaLaunchKernel", DeviceType.CPU, self_us=50.0),
        event("cudaStreamSynchronize", DeviceType.CPU, self_us=250.0),
        event("Optimizer.step#SGD.step", DeviceType.CPU, self_us=80.0),   # Python inside a record_function
        event("kernel_a", DeviceType.CUDA, start=0.0, end=400.0),
        event("kernel_b", DeviceType.CUDA, start=300.0, end=500.0),       # overlaps kernel_a by 100 us
        event("kernel_c", DeviceType.CUDA, start=700.0, end=800.0),
        # the GPU-side span of a record_function: not GPU work
        SimpleNamespace(name="Optimizer.step#SGD.step", device_type=DeviceType.CUDA, self_cpu_time_total=0.0,
                        is_async=False, time_range=SimpleNamespace(start=0.0, end=1000.0), is_user_annotation=True),
    ]
    p = gpu.summarize_profile(events, wall_s=1e-3, cuda=True)
    assert p["kernel_s"] == pytest.approx(600e-6) and p["kernels"] == 3 and p["launches"] == 2
    assert p["ops_s"] == pytest.approx(300e-6) and p["launch_s"] == pytest.approx(150e-6)
    assert p["sync_s"] == pytest.approx(250e-6) and p["python_s"] == pytest.approx(300e-6)
    assert p["ops_share"] + p["launch_share"] + p["sync_share"] + p["python_share"] == pytest.approx(1.0)

    cpu = gpu.summarize_profile(events[:1], wall_s=1e-3, cuda=False)
    assert cpu["kernel_share"] is None and cpu["launch_share"] is None
    assert cpu["ops_share"] == pytest.approx(0.3) and cpu["python_share"] == pytest.approx(0.7)


@pytest.mark.parametrize("options", [dict(), dict(chunk=2), dict(chunk=5), dict(K=2)], ids=str)
def test_benchmark_network_trains_the_same_with_emulated_cuda_graphs(gpu, monkeypatch, options):
    """The network the GPU targets are about (narrow and small here), with fused neurons, packed spikes and
    rebuilt membranes: online SLTT through (emulated, tests/graph_emulator.py) CUDA graphs equals eager
    training bit for bit, for the chunks and SLTT-K that benchmarks/gpu.py runs with --cuda-graphs."""
    import torch
    from spikingjelly.activation_based import functional

    import snn_localrules as slr
    from tests.graph_emulator import emulate

    def train(cuda_graphs):
        torch.manual_seed(0)
        model = gpu.build_vgg11(0.125, "avg", 2.0)
        functional.set_step_mode(model, "m")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, cuda_graphs=cuda_graphs, seed=0, **options)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            x = (torch.rand(6, 4, 2, 16, 16, generator=g) < 0.2).float()
            losses.append(learner.step(x, torch.randint(0, 10, (4,), generator=g)).loss)
        return model, learner, losses

    eager_model, _, eager = train(False)
    made = emulate(monkeypatch)
    model, learner, graphed = train(True)
    assert learner.graphs.off is None and sum(g.replays for g in made) > 0
    assert graphed == eager
    assert all(torch.equal(a, b) for a, b in zip(eager_model.parameters(), model.parameters()))


@needs_sj_online
def test_step_memory_counts_what_one_online_step_keeps(tmp_path):
    # benchmarks/step_memory.py at a small size: this plugin's online step keeps under half of what
    # SpikingJelly's own online SLTT keeps (spikes as 1-byte counts, no membrane for batch-norm-fed
    # neurons), and never more than it even without packing and rebuilding
    spec = importlib.util.spec_from_file_location("step_memory_under_test", ROOT / "benchmarks" / "step_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step_memory.json"
    assert bench.main(["--batches", "4", "--width", "0.125", "--size", "16", "--threads", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["batch_size"] == 4 and row["sj_online"] > 0
    assert row["sltt"] < 0.5 * row["sj_online"]
    assert row["sltt"] < row["sltt_plain"] <= row["sj_online"]


def test_step_ops_counts_forward_and_backward_of_every_step(tmp_path):
    # benchmarks/step_ops.py at T=4: the counter sees the backward's operations too (one conv backward per
    # conv per chunk: a chunk of 2 steps runs each conv once on both), chunks of 2 dispatch fewer operations per step than chunk 1, and packing and the
    # membrane rebuild add kernels (the copies to and from uint8, the batch norm run again)
    spec = importlib.util.spec_from_file_location("step_ops_under_test", ROOT / "benchmarks" / "step_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step_ops.json"
    methods = ["sltt_c1", "sltt_c1_plain", "sltt_c2"]
    assert bench.main(["--T", "4", "--rounds", "1", "--warmup", "0", "--methods", *methods, "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    convs = 8  # gpu.py's VGG-11
    for method, row in rows.items():
        assert row["host_ms_per_step"] > 0 and row["other_ops_per_step"] > 0
        assert row["ops"]["aten.convolution_backward"] == convs * 4 // bench.METHODS[method]["chunk"]
    c1, plain, c2 = (rows[m]["kernel_ops_per_step"] for m in methods)
    assert c2 < c1 and plain < c1
    assert rows["sltt_c1"]["ops"]["aten.native_batch_norm"] == 2 * rows["sltt_c1_plain"]["ops"]["aten.native_batch_norm"]
