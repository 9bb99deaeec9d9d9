"""CUDA kernels (compiled by CuPy) for the fused multi-step SLTT neuron of
:mod:`snn_localrules.functional.sltt_multistep`.

One thread per neuron, a loop over T inside it (the recurrence is sequential in time, independent across
neurons); grid-stride, so any grid covers any N. The forward writes the spikes, the final membrane, and on
request the charged membrane H and the post-reset membrane of every step. The backward is SLTT's
elementwise one, over all T in the same thread, from H, or from the input and the spikes when H was not
kept (a neuron fed by a batch norm, :mod:`snn_localrules.functional.norm_recompute`): it charges again on
the way. PLIF's ``w`` gradient is summed over t per neuron here and over neurons by torch.

Every arithmetic step is rounded to the storage dtype as torch's elementwise kernels round each op's result
(``rnd``), in the order of ``sltt_multistep._charge`` / ``_reset``, so the spikes equal the torch path's bit
for bit in float16/bfloat16 too. Compute is float (double for float64).

The source compiles as CUDA (CuPy/NVRTC, or ``nvcc``) and, with :data:`CPU_PRELUDE`, as plain C++: the
tests build it with the host compiler and check it against the torch implementation on the CPU, so the
kernels' arithmetic is tested on machines without a GPU; the same tests run it through CuPy on a GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch

from ..errors import BackendError

#: surrogate class name -> id in the kernel's ``surrogate_grad``; the formulas are those of the SpikingJelly
#: adapter's closed forms (``adapters/spikingjelly.py``), which its tests check against each class
SURROGATE_IDS = {
    "Sigmoid": 0, "ATan": 1, "PiecewiseQuadratic": 2, "PiecewiseExp": 3, "Erf": 4, "SoftSign": 5,
    "SuperSpike": 6,
}
_KIND_IDS = {"if": 0, "lif": 1, "plif": 2}

KERNEL_SOURCE = r"""
typedef SLR_SCALAR scalar_t;
typedef SLR_ACC acc_t;

/* round to the storage type and back: what torch does after every elementwise op */
SLR_DEVICE acc_t rnd(acc_t v) { return SLR_LOAD(SLR_STORE(v)); }

/* H from the input x and the carried membrane v (sltt_multistep._charge, same ops, same order).
   kind 0: IF; 1: LIF (c = tau, divides); 2: PLIF (c = k = sigmoid(w), multiplies). r: reset value. */
SLR_DEVICE acc_t charge(int kind, int decay, acc_t x, acc_t v, acc_t c, acc_t r) {
    if (kind == 0) return rnd(v + x);
    acc_t leak = (r != (acc_t)0) ? rnd(v - r) : v;
    if (decay) {
        acc_t d = rnd(x - leak);
        leak = (kind == 1) ? rnd(d / c) : rnd(d * c);
        return rnd(v + leak);
    }
    leak = (kind == 1) ? rnd(leak / c) : rnd(leak * c);
    return rnd(rnd(v - leak) + x);
}

/* the membrane after the spike s (sltt_multistep._reset) */
SLR_DEVICE acc_t reset(int hard, acc_t h, acc_t s, acc_t v_th, acc_t r) {
    if (!hard) return rnd(h - rnd(s * v_th));
    return rnd(rnd(s * r) + rnd(rnd((acc_t)1 - s) * h));
}

/* d spike / d z of SpikingJelly's surrogates (spiking mode) */
SLR_DEVICE acc_t surrogate_grad(int id, acc_t alpha, acc_t z) {
    const acc_t pi = (acc_t)3.14159265358979323846;
    acc_t a = z < (acc_t)0 ? -z : z;
    switch (id) {
    case 0: { acc_t s = (acc_t)1 / ((acc_t)1 + exp(-alpha * z)); return alpha * s * ((acc_t)1 - s); }
    case 1: { acc_t u = pi * alpha / (acc_t)2 * z; return alpha / (acc_t)2 / ((acc_t)1 + u * u); }
    case 2: { acc_t g = alpha - alpha * alpha * a; return g > (acc_t)0 ? g : (acc_t)0; }
    case 3: return alpha / (acc_t)2 * exp(-alpha * a);
    case 4: { acc_t u = alpha * z; return alpha / sqrt(pi) * exp(-u * u); }
    case 5: { acc_t u = (acc_t)1 / alpha + a; return (acc_t)1 / ((acc_t)2 * alpha * u * u); }
    default: { acc_t u = (acc_t)1 + a; return alpha / (u * u); }
    }
}

/* x, spikes, h_seq, v_seq: [T, N]; v_init, v_last: [N]; k: PLIF's sigmoid(w) (1 value, in the compute
   type) or null.
   h_seq, v_seq may be null (not kept). */
SLR_GLOBAL void slr_sltt_forward(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init, const acc_t* __restrict__ k,
    scalar_t* __restrict__ spikes, scalar_t* __restrict__ h_seq, scalar_t* __restrict__ v_seq,
    scalar_t* __restrict__ v_last,
    int kind, int decay, int hard, double tau, double v_th, double v_reset, int T, long long N)
{
    const acc_t c = kind == 1 ? (acc_t)tau : (kind == 2 ? rnd((acc_t)k[0]) : (acc_t)0);
    const acc_t r = hard ? (acc_t)v_reset : (acc_t)0;
    const acc_t th = (acc_t)v_th;
    for (long long n = SLR_FIRST; n < N; n += SLR_STRIDE) {
        acc_t v = SLR_LOAD(v_init[n]);
        for (int t = 0; t < T; ++t) {
            const long long i = (long long)t * N + n;
            const acc_t h = charge(kind, decay, SLR_LOAD(x[i]), v, c, r);
            const acc_t s = rnd(h - th) >= (acc_t)0 ? (acc_t)1 : (acc_t)0;
            spikes[i] = SLR_STORE(s);
            if (h_seq) h_seq[i] = SLR_STORE(h);
            v = reset(hard, h, s, th, r);
            if (v_seq) v_seq[i] = SLR_STORE(v);
        }
        v_last[n] = SLR_STORE(v);
    }
}

/* SLTT's backward, all T of one neuron in one thread (the carried membrane is a constant under SLTT).
   H from h_seq, or (h_seq null) charged again from x, v_init and the forward's spikes (spikes null: taken
   again from each charged H, when x is the forward's input itself rather than a rebuilt one).
   grad_spikes, grad_v_seq: [T, N] or null; grad_v_last: [N] or null.
   grad_x: [T, N] out; grad_k: [N] out (sum over t of dL/dH * dH/dk) or null. x is needed when h_seq is null
   and for grad_k with decay; v_init when h_seq is null and for grad_k. */
SLR_GLOBAL void slr_sltt_backward(
    const scalar_t* __restrict__ h_seq, const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
    const scalar_t* __restrict__ spikes, const acc_t* __restrict__ k,
    const scalar_t* __restrict__ grad_spikes, const scalar_t* __restrict__ grad_v_seq,
    const scalar_t* __restrict__ grad_v_last,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_k,
    int kind, int decay, int hard, int detach_reset, double tau, double v_th, double v_reset,
    int surrogate, double alpha, int T, long long N)
{
    const acc_t c = kind == 1 ? (acc_t)tau : (kind == 2 ? rnd((acc_t)k[0]) : (acc_t)0);
    const acc_t r = hard ? (acc_t)v_reset : (acc_t)0;
    const acc_t th = (acc_t)v_th;
    const int track_v = (h_seq == 0) || (grad_k != 0);
    for (long long n = SLR_FIRST; n < N; n += SLR_STRIDE) {
        acc_t v = track_v ? SLR_LOAD(v_init[n]) : (acc_t)0;
        acc_t gk = 0;
        for (int t = 0; t < T; ++t) {
            const long long i = (long long)t * N + n;
            acc_t h, s;
            if (h_seq) {
                h = SLR_LOAD(h_seq[i]);
                s = rnd(h - th) >= (acc_t)0 ? (acc_t)1 : (acc_t)0;
            } else {  /* no spikes: x is the forward's own input, so this h is its h, and so is s */
                h = charge(kind, decay, SLR_LOAD(x[i]), v, c, r);
                s = spikes ? SLR_LOAD(spikes[i]) : (rnd(h - th) >= (acc_t)0 ? (acc_t)1 : (acc_t)0);
            }
            acc_t gv = grad_v_seq ? SLR_LOAD(grad_v_seq[i]) : (acc_t)0;
            if (grad_v_last && t == T - 1) gv += SLR_LOAD(grad_v_last[n]);
            const int has_gv = grad_v_seq != 0 || (grad_v_last != 0 && t == T - 1);
            acc_t gs = grad_spikes ? SLR_LOAD(grad_spikes[i]) : (acc_t)0;
            if (has_gv && !detach_reset) gs += gv * (hard ? r - h : -th);
            acc_t gh = gs * surrogate_grad(surrogate, (acc_t)alpha, h - th);
            if (has_gv) gh += hard ? gv * ((acc_t)1 - s) : gv;
            if (grad_k) {
                const acc_t leak = v - r;
                gk += gh * (decay ? SLR_LOAD(x[i]) - leak : -leak);
            }
            if (kind == 1 && decay) gh = gh / c;
            else if (kind == 2 && decay) gh = gh * c;
            grad_x[i] = SLR_STORE(gh);
            if (track_v) v = reset(hard, h, s, th, r);
        }
        if (grad_k) grad_k[n] = gk;
    }
}
"""

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: CUDA prelude per dtype: (scalar type, compute type, load, store, header)
_CUDA_TYPES: Dict[torch.dtype, Tuple[str, str, str, str, str]] = {
    torch.float32: ("float", "float", "(acc_t)(v)", "(scalar_t)(v)", ""),
    torch.float64: ("double", "double", "(acc_t)(v)", "(scalar_t)(v)", ""),
    torch.float16: ("__half", "float", "__half2float(v)", "__float2half_rn(v)", "#include <cuda_fp16.h>\n"),
    torch.bfloat16: ("__nv_bfloat16", "float", "__bfloat162float(v)", "__float2bfloat16_rn(v)",
                     "#include <cuda_bf16.h>\n"),
}

#: what makes the source plain C++ for the host compiler: one "thread" walks every neuron
CPU_PRELUDE = """#include <cmath>
using std::exp; using std::sqrt;
#define SLR_DEVICE static inline
#define SLR_GLOBAL extern "C"
#define SLR_FIRST 0
#define SLR_STRIDE 1
#define __restrict__
"""


def cuda_source(dtype: torch.dtype) -> str:
    """The kernel source for tensors of ``dtype``, as NVRTC (CuPy) or nvcc compile it."""
    if dtype not in _CUDA_TYPES:
        raise BackendError(f"the CUDA kernels take float16, bfloat16, float32 or float64 tensors, not {dtype}.")
    scalar, acc, load, store, header = _CUDA_TYPES[dtype]
    prelude = (
        f"{header}#define SLR_SCALAR {scalar}\n#define SLR_ACC {acc}\n"
        f"#define SLR_LOAD(v) {load}\n#define SLR_STORE(v) {store}\n"
        "#define SLR_DEVICE __device__ __forceinline__ static\n#define SLR_GLOBAL extern \"C\" __global__\n"
        "#define SLR_FIRST ((long long)blockIdx.x * blockDim.x + threadIdx.x)\n"
        "#define SLR_STRIDE ((long long)blockDim.x * gridDim.x)\n"
    )
    return prelude + KERNEL_SOURCE


def cpu_source(dtype: torch.dtype) -> str:
    """The same kernels as C++ for the host compiler (float32 and float64 only): for the tests."""
    scalar = {torch.float32: "float", torch.float64: "double"}.get(dtype)
    if scalar is None:
        raise ValueError(f"the C++ build is for float32 and float64, not {dtype}.")
    return (CPU_PRELUDE + f"#define SLR_SCALAR {scalar}\n#define SLR_ACC {scalar}\n"
            "#define SLR_LOAD(v) ((acc_t)(v))\n#define SLR_STORE(v) ((scalar_t)(v))\n" + KERNEL_SOURCE)


# ------------------------------------------------------------------------------------------------------
# CuPy launch
# ------------------------------------------------------------------------------------------------------
_MODULES: Dict[Tuple[torch.dtype, int], object] = {}
#: (dtype, device index) -> why the kernels did not compile there (asked once; then the torch path runs)
_COMPILE_ERRORS: Dict[Tuple[torch.dtype, int], str] = {}
_THREADS = 256


def cupy_available() -> bool:
    """CuPy importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:  # not installed, or built for another CUDA
        return False
    return True


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``: a CUDA tensor, with CuPy installed."""
    return isinstance(x, torch.Tensor) and x.is_cuda and cupy_available()


def _key(dtype: torch.dtype, device: torch.device) -> Tuple[torch.dtype, int]:
    return dtype, device.index if device.index is not None else torch.cuda.current_device()


def _compile(dtype: torch.dtype, device_index: int):
    """The kernels for ``dtype`` as a CuPy module on that device, both functions loaded (which compiles)."""
    import cupy

    with cupy.cuda.Device(device_index):
        # no fused multiply-add: torch rounds every op, and so must the kernels to match its spikes
        module = cupy.RawModule(code=cuda_source(dtype), options=("--std=c++14", "--fmad=false"))
        for name in ("slr_sltt_forward", "slr_sltt_backward"):
            module.get_function(name)
    return module


def compile_error(x: torch.Tensor) -> Optional[str]:
    """None when the kernels for ``x``'s dtype are ready on its device (compiled on the first ask, once per
    dtype and device; CuPy caches the binary on disk too), else why they did not compile (NVRTC's message),
    remembered: a CUDA toolkit without the half-precision headers, say."""
    key = _key(x.dtype, x.device)
    if key in _MODULES:
        return None
    if key not in _COMPILE_ERRORS:
        try:
            _MODULES[key] = _compile(*key)
            return None
        except Exception as exc:  # CuPy's CompileException, a driver error, ...
            _COMPILE_ERRORS[key] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
            warnings.warn(
                f"snn-localrules: the CUDA kernels of the fused SLTT neuron did not compile for {x.dtype} on "
                f"cuda:{key[1]}, so its torch implementation runs there instead (same results, more launches). "
                f"The compiler said: {_COMPILE_ERRORS[key]}", RuntimeWarning, stacklevel=3)
    return _COMPILE_ERRORS[key]


def _function(dtype: torch.dtype, device: torch.device, name: str):
    key = _key(dtype, device)
    module = _MODULES.get(key)
    if module is None:
        module = _MODULES[key] = _compile(*key)
    return module.get_function(name)


def _ptr(tensor: Optional[torch.Tensor]):
    """A pointer argument as an explicit 8-byte integer: how CuPy passes a plain Python ``int`` to a raw
    kernel has changed between its releases, a NumPy scalar's size has not."""
    import numpy as np

    return np.uint64(0 if tensor is None else tensor.data_ptr())


def _launch(name: str, x: torch.Tensor, N: int, args: tuple) -> None:
    import cupy

    blocks = max(1, min(math.ceil(N / _THREADS), 65535))
    with cupy.cuda.Device(x.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream):
        _function(x.dtype, x.device, name)((blocks,), (_THREADS,), args)


def _check(tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    if tensor.device != like.device or tensor.dtype != like.dtype:
        tensor = tensor.to(device=like.device, dtype=like.dtype)
    return tensor.contiguous()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic type for tensors of ``dtype`` (of ``k`` and of the ``w`` gradient too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constants(kind: str, k: Optional[torch.Tensor], tau: float, v_th: float, v_reset: Optional[float], x: torch.Tensor):
    import numpy as np

    k_acc = None if k is None else k.detach().reshape(1).to(device=x.device, dtype=compute_dtype(x.dtype)).contiguous()
    return (k_acc, np.int32(_KIND_IDS[kind]), np.float64(tau), np.float64(v_th),
            np.int32(v_reset is not None), np.float64(0.0 if v_reset is None else v_reset))


def forward(kind: str, x_seq: torch.Tensor, v_init: torch.Tensor, k: Optional[torch.Tensor], *, tau: float,
            decay_input: bool, v_threshold: float, v_reset: Optional[float], keep_h: bool, store_v_seq: bool):
    """``(spikes, v_last, h_seq or None, v_seq or None)`` of one multi-step call, on the GPU."""
    import numpy as np

    x = x_seq.contiguous()
    T, N = x.shape[0], x[0].numel()
    v0 = _check(v_init, x)
    spikes = torch.empty_like(x)
    h_seq = torch.empty_like(x) if keep_h else None
    v_seq = torch.empty_like(x) if store_v_seq else None
    v_last = torch.empty_like(x[0])
    k32, kind_id, tau64, th64, hard, r64 = _constants(kind, k, tau, v_threshold, v_reset, x)
    if N:
        _launch("slr_sltt_forward", x, N, (
            _ptr(x), _ptr(v0), _ptr(k32), _ptr(spikes), _ptr(h_seq), _ptr(v_seq), _ptr(v_last),
            kind_id, np.int32(decay_input), hard, tau64, th64, r64, np.int32(T), np.int64(N)))
    return spikes, v_last, h_seq, v_seq


def backward(kind: str, *, h_seq: Optional[torch.Tensor], x_seq: Optional[torch.Tensor],
             v_init: Optional[torch.Tensor], spikes: Optional[torch.Tensor], k: Optional[torch.Tensor],
             grad_spikes: Optional[torch.Tensor], grad_v_seq: Optional[torch.Tensor],
             grad_v: Optional[torch.Tensor], need_grad_k: bool, tau: float, decay_input: bool,
             v_threshold: float, v_reset: Optional[float], detach_reset: bool, surrogate: str, alpha: float):
    """``(dL/dX [T, N, ...], dL/dk (0-dim, :func:`compute_dtype`) or None)``, on the GPU."""
    import numpy as np

    like = h_seq if h_seq is not None else x_seq
    like = like.contiguous()
    T, N = like.shape[0], like[0].numel()
    grad_x = torch.empty_like(like)
    grad_k = torch.empty(N, device=like.device, dtype=compute_dtype(like.dtype)) if need_grad_k else None
    k32, kind_id, tau64, th64, hard, r64 = _constants(kind, k, tau, v_threshold, v_reset, like)
    args = [_check(t, like) for t in (h_seq, x_seq, v_init, spikes)]
    grads = [_check(t, like) for t in (grad_spikes, grad_v_seq, grad_v)]
    if N:
        _launch("slr_sltt_backward", like, N, (
            *(_ptr(t) for t in args), _ptr(k32), *(_ptr(t) for t in grads), _ptr(grad_x), _ptr(grad_k),
            kind_id, np.int32(decay_input), hard, np.int32(detach_reset), tau64, th64, r64,
            np.int32(SURROGATE_IDS[surrogate]), np.float64(alpha), np.int32(T), np.int64(N)))
    return grad_x, (grad_k.sum() if grad_k is not None else None)
