"""The CUDA kernels of the fused SLTT neuron (snn_localrules.kernels.sltt_cuda).

Their arithmetic is tested without a GPU: the same source is built as C++ by the host compiler (one "thread"
walks every neuron) and run on CPU tensors, against the torch implementation of
snn_localrules.functional.sltt_multistep (itself tested against SpikingJelly and the per-step reference):
spikes bit for bit, membranes to 1e-6, gradients to 1e-5 relative, for every neuron x reset x decay_input x
detach_reset, every surrogate the kernels know, from a kept H and from H charged again (a batch-norm-fed
neuron), with and without losses on the membrane outputs. ``nvcc`` (when installed) compiles the CUDA form
for every dtype. On a GPU with CuPy, the kernels themselves run through ``sltt_multi_step(backend="cupy")``.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import warnings

import pytest
import torch

sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")

from snn_localrules.adapters.spikingjelly import surrogate_derivative  # noqa: E402
from snn_localrules.kernels import sltt_cuda  # noqa: E402
from snn_localrules.functional.sltt_multistep import sltt_multi_step  # noqa: E402
from test_sltt_multistep import (  # noqa: E402
    CONFIGS, TAU, THRESHOLD, _assert_rel_close, _config_id, _spike_rate_ok, make_input, plif_w,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SURROGATES = {  # SpikingJelly surrogate class -> alpha
    "Sigmoid": 4.0, "ATan": 2.0, "PiecewiseQuadratic": 1.0, "PiecewiseExp": 2.0, "Erf": 2.0, "SoftSign": 2.0,
    "SuperSpike": 3.0,
}
SURROGATES = {name: alpha for name, alpha in SURROGATES.items() if hasattr(sj_surrogate, name)}


def _surrogate(name):
    return getattr(sj_surrogate, name)(alpha=SURROGATES[name])


# ------------------------------------------------------------------------------------------------------
# the C++ build
# ------------------------------------------------------------------------------------------------------
_P, _I, _D, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_longlong


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the kernels for the CPU")
    libraries = {}
    for dtype in (torch.float32, torch.float64):
        folder = tmp_path_factory.mktemp(f"kernels_{str(dtype).split('.')[-1]}")
        source, library = folder / "kernels.cpp", folder / "kernels.so"
        source.write_text(sltt_cuda.cpu_source(dtype))
        # -ffp-contract=off: no fused multiply-add, as the CUDA build (--fmad=false) and torch
        subprocess.run([compiler, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(library), str(source)],
                       check=True, capture_output=True)
        lib = ctypes.CDLL(str(library))
        lib.slr_sltt_forward.argtypes = [_P] * 7 + [_I, _I, _I, _D, _D, _D, _I, _L]
        lib.slr_sltt_backward.argtypes = [_P] * 10 + [_I, _I, _I, _I, _D, _D, _D, _I, _D, _I, _L]
        libraries[dtype] = lib
    return libraries


def _ptr(t):
    return None if t is None else t.data_ptr()


def cpu_forward(lib, kind, x, v0, k, decay, v_reset, keep_h=True):
    x = x.contiguous()
    spikes, h, v_seq, v_last = (torch.empty_like(x), torch.empty_like(x) if keep_h else None, torch.empty_like(x),
                                torch.empty_like(x[0]))
    k32 = None if k is None else k.detach().reshape(1).to(sltt_cuda.compute_dtype(x.dtype)).contiguous()
    lib.slr_sltt_forward(_ptr(x), _ptr(v0), _ptr(k32), _ptr(spikes), _ptr(h), _ptr(v_seq), _ptr(v_last),
                         sltt_cuda._KIND_IDS[kind], int(decay), int(v_reset is not None), TAU, THRESHOLD,
                         0.0 if v_reset is None else v_reset, x.shape[0], x[0].numel())
    return spikes, v_last, h, v_seq


def cpu_backward(lib, kind, h, x, v0, spikes, k, gs, gvs, gv, need_k, decay, v_reset, detach, sg_name):
    like = h if h is not None else x
    grad_x = torch.empty_like(like)
    grad_k = torch.empty(like[0].numel(), dtype=sltt_cuda.compute_dtype(like.dtype)) if need_k else None
    k32 = None if k is None else k.detach().reshape(1).to(sltt_cuda.compute_dtype(like.dtype)).contiguous()
    lib.slr_sltt_backward(
        _ptr(h), _ptr(x), _ptr(v0), _ptr(spikes), _ptr(k32), _ptr(gs), _ptr(gvs), _ptr(gv), _ptr(grad_x),
        _ptr(grad_k), sltt_cuda._KIND_IDS[kind], int(decay), int(v_reset is not None), int(detach), TAU, THRESHOLD,
        0.0 if v_reset is None else v_reset, sltt_cuda.SURROGATE_IDS[sg_name], SURROGATES[sg_name], like.shape[0],
        like[0].numel())
    return grad_x, (grad_k.sum() if grad_k is not None else None)


def _inputs(dtype):
    """The input and initial membrane of test_sltt_multistep's backward test."""
    return make_input(dtype), make_input(dtype, seed=1)[0] * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_cpu_build_forward_equals_torch(cpu_kernels, cfg, dtype):
    kind, v_reset, decay, detach = cfg
    x, v0 = _inputs(dtype)
    w = plif_w(dtype) if kind == "plif" else None
    sg = _surrogate("Sigmoid")
    ref_s, ref_v, ref_vs = sltt_multi_step(x, v0, kind, surrogate_function=sg, tau=TAU, w=w, decay_input=decay,
                                           v_threshold=THRESHOLD, v_reset=v_reset, detach_reset=detach,
                                           store_v_seq=True)
    k = torch.sigmoid(w) if w is not None else None
    spikes, v_last, h, v_seq = cpu_forward(cpu_kernels[dtype], kind, x, v0, k, decay, v_reset)
    _spike_rate_ok(ref_s)
    assert torch.equal(spikes, ref_s)
    torch.testing.assert_close(v_last, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_seq, ref_vs, rtol=1e-6, atol=1e-6)
    # H is the membrane before the reset: where no spike, it is the stored membrane
    assert torch.equal(torch.where(spikes > 0, v_seq, h), v_seq)


@pytest.mark.parametrize("recharge", [False, True], ids=["kept-H", "charged-again"])
@pytest.mark.parametrize("use_v_outputs", [False, True], ids=["spikes", "spikes+v"])
@pytest.mark.parametrize("sg_name", sorted(SURROGATES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_cpu_build_backward_equals_torch(cpu_kernels, cfg, sg_name, use_v_outputs, recharge):
    dtype = torch.float64
    kind, v_reset, decay, detach = cfg
    x, v0 = _inputs(dtype)
    sg = _surrogate(sg_name)
    w = plif_w(dtype).requires_grad_(True) if kind == "plif" else None
    xr = x.clone().requires_grad_(True)
    spikes, v, v_seq = sltt_multi_step(xr, v0, kind, surrogate_function=sg, tau=TAU, w=w, decay_input=decay,
                                       v_threshold=THRESHOLD, v_reset=v_reset, detach_reset=detach,
                                       store_v_seq=True, surrogate_derivative=surrogate_derivative(sg))
    g = torch.Generator().manual_seed(2)
    gs = torch.randn(spikes.shape, generator=g, dtype=dtype)
    gvs = torch.randn(v_seq.shape, generator=g, dtype=dtype) if use_v_outputs else None
    gv = torch.randn(v.shape, generator=g, dtype=dtype) if use_v_outputs else None
    outputs = [spikes] + ([v_seq, v] if use_v_outputs else [])
    grads = [gs] + ([gvs, gv] if use_v_outputs else [])
    torch.autograd.backward(outputs, grads)

    k = torch.sigmoid(w.detach()) if w is not None else None
    lib = cpu_kernels[dtype]
    s_k, _, h, _ = cpu_forward(lib, kind, x, v0, k, decay, v_reset, keep_h=not recharge)
    need_k = kind == "plif"
    grad_x, grad_k = cpu_backward(lib, kind, h, x if (recharge or need_k) else None, v0, s_k, k, gs, gvs, gv,
                                  need_k, decay, v_reset, detach, sg_name)
    _assert_rel_close(grad_x, xr.grad, "input gradient")
    if need_k:
        grad_w = grad_k.double() * k * (1.0 - k)
        _assert_rel_close(grad_w.reshape(1), w.grad.reshape(1), "w gradient")


@pytest.fixture
def kernels_on_cpu(cpu_kernels, monkeypatch):
    """backend="cupy" with every launch run by the C++ build on the CPU: the Python side of the kernel path
    (argument order, saved tensors, the batch-norm rebuild, a filled initial membrane) without a GPU."""
    import numpy as np

    def launch(name, x, N, args):
        pointers = 7 if name == "slr_sltt_forward" else 10  # then ints and doubles, as numpy scalars
        assert all(type(a) is np.uint64 for a in args[:pointers])  # 8 bytes whatever CuPy makes of an int
        values = [(int(a) or None) if i < pointers else int(a) if isinstance(a, np.integer) else float(a)
                  for i, a in enumerate(args)]
        getattr(cpu_kernels[x.dtype], name)(*values)

    monkeypatch.setattr(sltt_cuda, "runs_on", lambda x: isinstance(x, torch.Tensor))
    monkeypatch.setattr(sltt_cuda, "compile_error", lambda x: None)
    monkeypatch.setattr(sltt_cuda, "_launch", launch)


@pytest.mark.parametrize("use_v_outputs", [False, True], ids=["spikes", "spikes+v"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_kernel_path_through_autograd_equals_torch(kernels_on_cpu, cfg, use_v_outputs):
    kind, v_reset, decay, detach = cfg
    x, v0 = _inputs(torch.float64)
    sg = _surrogate("ATan")
    results = {}
    for backend in ("torch", "cupy"):
        xr = x.clone().requires_grad_(True)
        w = plif_w(torch.float64).requires_grad_(True) if kind == "plif" else None
        s, v, vs = sltt_multi_step(xr, 0.25, kind, surrogate_function=sg, tau=TAU, w=w, decay_input=decay,
                                   v_threshold=THRESHOLD, v_reset=v_reset, detach_reset=detach, store_v_seq=True,
                                   surrogate_derivative=surrogate_derivative(sg), backend=backend)
        assert type(s.grad_fn).__name__ == "SLTTMultiStepBackward" and s.grad_fn.cfg.backend == backend
        if kind == "plif" and decay:  # it keeps its input for d H / d k, and no H: backward charges again
            assert s.grad_fn.saved_tensors[0] is None and s.grad_fn.saved_tensors[2] is xr
        g = torch.Generator().manual_seed(4)
        loss = (s * torch.randn(s.shape, generator=g, dtype=torch.float64)).sum()
        if use_v_outputs:
            loss = loss + (vs * torch.randn(vs.shape, generator=g, dtype=torch.float64)).sum() + v.sum()
        loss.backward()
        results[backend] = (s.detach(), vs.detach(), xr.grad, None if w is None else w.grad.reshape(1))
    (s_t, vs_t, gx_t, gw_t), (s_c, vs_c, gx_c, gw_c) = results["torch"], results["cupy"]
    assert torch.equal(s_c, s_t)
    torch.testing.assert_close(vs_c, vs_t, rtol=1e-12, atol=1e-12)
    _assert_rel_close(gx_c, gx_t, "input gradient")
    if gw_t is not None:
        _assert_rel_close(gw_c, gw_t, "w gradient")


def test_kernel_path_with_a_batch_norm_fed_neuron_equals_torch(kernels_on_cpu, monkeypatch):
    """Zero-change SLTT on a conv-BN-neuron model: the kernel path (backend picked by "auto") charges again
    from the rebuilt batch-norm output and gives the torch path's gradients."""
    import copy

    from test_norm_recompute import _data, _train_grads, vgg_like

    model = vgg_like().double()
    twin = copy.deepcopy(model)
    x, y = _data()
    on, rebuilt = _train_grads(model, x.double(), y)
    assert sum(rebuilt) == 2
    monkeypatch.setattr(sltt_cuda, "runs_on", lambda x: False)  # the torch path for the reference
    ref, _ = _train_grads(twin, x.double(), y)
    for name in ref:
        torch.testing.assert_close(on[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_cuda_source_compiles_for_every_dtype(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        source = tmp_path / f"kernels_{str(dtype).split('.')[-1]}.cu"
        source.write_text(sltt_cuda.cuda_source(dtype))
        result = subprocess.run([nvcc, "-ptx", "-arch=sm_80", "--std=c++14", "--fmad=false", "-o",
                                 str(source.with_suffix(".ptx")), str(source)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        ptx = source.with_suffix(".ptx").read_text()
        assert ".entry slr_sltt_forward" in ptx and ".entry slr_sltt_backward" in ptx


def test_kernels_that_do_not_compile_leave_the_torch_path_with_one_warning(monkeypatch):
    # a machine whose CuPy cannot compile the kernels (no cuda_bf16.h for NVRTC, say): backend="auto" warns
    # once, with the compiler's message, and runs the torch implementation; backend="cupy" says why it cannot
    from snn_localrules.errors import BackendError

    tries = []

    def failing_compile(dtype, device_index):
        tries.append(dtype)
        raise RuntimeError("catastrophic error: cannot open source file \"cuda_bf16.h\"")

    monkeypatch.setattr(sltt_cuda, "_MODULES", {})
    monkeypatch.setattr(sltt_cuda, "_COMPILE_ERRORS", {})
    monkeypatch.setattr(sltt_cuda, "runs_on", lambda x: isinstance(x, torch.Tensor))
    monkeypatch.setattr(sltt_cuda, "_key", lambda dtype, device: (dtype, 0))
    monkeypatch.setattr(sltt_cuda, "_compile", failing_compile)
    sg = sj_surrogate.Sigmoid(alpha=4.0)
    x = make_input(torch.float64).requires_grad_(True)
    twin = x.detach().clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="did not compile for torch.float64.*cuda_bf16.h"):
        spikes, _, _ = sltt_multi_step(x, 0.0, "lif", surrogate_function=sg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither compiles again nor warns again
        again, _, _ = sltt_multi_step(x, 0.0, "lif", surrogate_function=sg)
    reference, _, _ = sltt_multi_step(twin, 0.0, "lif", surrogate_function=sg, backend="torch")
    assert torch.equal(spikes, reference) and torch.equal(again, reference)
    (spikes * torch.linspace(-1, 1, spikes.shape[-1], dtype=spikes.dtype)).sum().backward()
    (reference * torch.linspace(-1, 1, spikes.shape[-1], dtype=spikes.dtype)).sum().backward()
    assert torch.equal(x.grad, twin.grad) and bool(x.grad.any())
    assert tries == [torch.float64]
    with pytest.raises(BackendError, match="did not compile for torch.float64.*cuda_bf16.h.*backend='torch'"):
        sltt_multi_step(x, 0.0, "lif", surrogate_function=sg, backend="cupy")


def test_unsupported_dtype_is_refused():
    with pytest.raises(Exception, match="float16, bfloat16, float32 or float64"):
        sltt_cuda.cuda_source(torch.int32)


# ------------------------------------------------------------------------------------------------------
# on a GPU: the kernels through CuPy
# ------------------------------------------------------------------------------------------------------
needs_cupy = pytest.mark.skipif(not sltt_cuda.cupy_available(), reason="needs CUDA and CuPy")


@needs_cupy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_cupy_backend_equals_torch_backend_on_gpu(cfg, dtype):
    kind, v_reset, decay, detach = cfg
    x, v0 = (t.cuda().to(dtype) for t in _inputs(torch.float32))
    sg = _surrogate("Sigmoid")
    results = {}
    for backend in ("torch", "cupy"):
        xr = x.clone().requires_grad_(True)
        w = plif_w(torch.float32).cuda().requires_grad_(True) if kind == "plif" else None
        s, v, vs = sltt_multi_step(xr, v0, kind, surrogate_function=sg, tau=TAU, w=w, decay_input=decay,
                                   v_threshold=THRESHOLD, v_reset=v_reset, detach_reset=detach, store_v_seq=True,
                                   surrogate_derivative=surrogate_derivative(sg), backend=backend)
        g = torch.Generator(device="cuda").manual_seed(2)
        (s * torch.randn(s.shape, generator=g, device="cuda").to(dtype)).sum().backward()
        results[backend] = (s.detach(), v.detach(), xr.grad, None if w is None else w.grad)
    (s_t, v_t, gx_t, gw_t), (s_c, v_c, gx_c, gw_c) = results["torch"], results["cupy"]
    assert torch.equal(s_c, s_t)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(v_c, v_t, rtol=tol, atol=tol)
    _assert_rel_close(gx_c.float(), gx_t.float(), "input gradient", rtol=tol)
    if gw_t is not None:
        _assert_rel_close(gw_c.reshape(1).float(), gw_t.reshape(1).float(), "w gradient", rtol=tol)
