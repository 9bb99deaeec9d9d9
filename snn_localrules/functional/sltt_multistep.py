"""Multi-step IF / LIF / ParametricLIF neurons with SLTT's backward, in one autograd node.

Under SLTT the membrane carried from step t-1 into step t is a constant in backward (Meng et al.
2023). Then nothing links two time steps in backward, and the gradient of a whole ``[T, N, ...]`` call is
elementwise over time::

    dL/dH[t] = dL/ds[t] * sg(H[t] - theta)  (+ terms from dL/dV[t] if the membrane itself is used)
    dL/dX[t] = dL/dH[t] * c,   c = 1/tau (LIF, decay_input), sigmoid(w) (PLIF, decay_input), else 1

where ``sg`` is the surrogate derivative. So the forward runs the T steps once under ``no_grad`` and keeps
only the charged membrane ``H`` (``[T, N, ...]``, the input's dtype); the backward is a few vectorised
tensor operations over all T at once, with no time loop and no stored ``V``.

The forward equations are SpikingJelly 2.0's (``spikingjelly.activation_based.neuron.IFNode``,
``LIFNode``, ``ParametricLIFNode``) written with the same operations in the same order, so spikes are
bit-identical and membranes equal to rounding (tested)::

    IF:              H[t] = V[t-1] + X[t]
    LIF, decay:      H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau
    LIF, no decay:   H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]
    PLIF:            the same with 1/tau replaced by k = sigmoid(w)
    spike:           s[t] = surrogate(H[t] - theta)           (Heaviside forward)
    soft reset:      V[t] = H[t] - s[t] * theta               (v_reset None; V_reset = 0 above)
    hard reset:      V[t] = s[t] * V_reset + (1 - s[t]) * H[t]

``detach_reset`` only matters for the gradient of the membrane outputs (``v`` and ``v_seq``): under SLTT
the reset feeds nothing else.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch

from ..errors import BackendError
from ..kernels import sltt_cuda
from .norm_recompute import NormSource, pending_source, recharge_allowed

SurrogateFunction = Callable[[torch.Tensor], torch.Tensor]
#: ``z -> d spike / d z`` elementwise, allowed to overwrite ``z`` (it receives a buffer of its own)
SurrogateDerivative = Callable[[torch.Tensor], torch.Tensor]

NEURON_KINDS = ("if", "lif", "plif")
BACKENDS = ("auto", "torch", "cupy")


@dataclass(frozen=True)
class _Neuron:
    """The constants of one call (everything but the tensors)."""

    kind: str
    tau: float
    decay_input: bool
    v_threshold: float
    v_reset: Optional[float]
    detach_reset: bool
    store_v_seq: bool
    surrogate_function: SurrogateFunction
    surrogate_derivative: Optional[SurrogateDerivative] = None
    backend: str = "torch"
    #: ``backend="cupy"``: the surrogate as the kernels know it, (SpikingJelly class name, alpha)
    kernel_surrogate: Optional[Tuple[str, float]] = None
    #: the surrogate is a SpikingJelly one whose forward is the Heaviside ``(z >= 0)``: spikes are computed
    #: directly, without an autograd Function call per step (the CUDA kernels assume the same)
    heaviside: bool = False

    def fire(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """The spikes of ``H`` into ``out``. A Heaviside surrogate compares directly: ``H - V_th >= 0``
        exactly when ``H >= V_th`` (IEEE subtraction rounds to zero only for equal operands and keeps the
        sign; tested at the threshold in every dtype), one pass with no temporaries. In half precision the
        subtraction stays: whether a kernel takes the scalar ``V_th`` in the tensor's dtype or in float32
        (for 0.3 two different numbers) may differ between the subtraction and the comparison, and between
        devices, so the spikes are SpikingJelly's own operation."""
        if self.heaviside:
            if h.dtype in (torch.float16, torch.bfloat16):
                torch.ge(h - self.v_threshold, 0, out=out)
            else:
                torch.ge(h, self.v_threshold, out=out)
        else:
            out.copy_(self.surrogate_function(h - self.v_threshold).detach())

    @property
    def reset_value(self) -> float:
        return 0.0 if self.v_reset is None else self.v_reset


def _charge(cfg: _Neuron, x: torch.Tensor, v: torch.Tensor, k: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """H = charge(X, V) written into ``out`` (which may be ``x``, not ``v``). The same operations in the same
    order as SpikingJelly 2.0's ``_ops/{if_,lif,plif}``, which keeps spikes bit-identical (``v - 0.0`` is
    ``v`` exactly: skipped), computed in ``out`` instead of temporaries (``a + b`` is ``b + a`` exactly)."""
    if cfg.kind == "if":
        torch.add(v, x, out=out)
        return
    leak = v - cfg.reset_value if cfg.reset_value != 0.0 else v
    if cfg.decay_input:  # V + (X - leak) / tau: X is read before out is written
        torch.sub(x, leak, out=out)
        (out.div_(cfg.tau) if cfg.kind == "lif" else out.mul_(k)).add_(v)
    else:  # (V - leak / tau) + X
        scaled = leak / cfg.tau if cfg.kind == "lif" else leak * k
        torch.add(torch.sub(v, scaled, out=scaled), x, out=out)


@functools.lru_cache(maxsize=64)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` as a tensor of ``dtype`` holds it: what ``spike * value`` is for a spike of 1. A fused
    ``h + alpha * spike`` may take ``alpha`` in float32 (CUDA does for half precision), so the threshold is
    rounded first; float32 and float64 keep it as SpikingJelly's products do."""
    return float(torch.tensor(value, dtype=dtype)) if dtype in (torch.float16, torch.bfloat16) else value


def _reset(cfg: _Neuron, h: torch.Tensor, spike: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """V after the spike, a new tensor (or ``out``, which must not be ``h``, and may be ``spike`` only for a
    soft Heaviside reset, a single add). Soft: ``H - s * theta``; hard:
    ``s * V_reset + (1 - s) * H``. With Heaviside spikes (0 or 1) every product is exact and one term of the
    hard sum is zero, so the fewer passes below give SpikingJelly's numbers (up to the sign of a zero
    membrane); other surrogates' outputs take SpikingJelly's own operations."""
    if not cfg.heaviside:
        if cfg.v_reset is None:
            v = h - spike * cfg.v_threshold
        else:
            v = spike * cfg.v_reset + (1.0 - spike) * h
        return v if out is None else out.copy_(v)
    if cfg.v_reset is None:
        return torch.add(h, spike, alpha=-_in_dtype(cfg.v_threshold, h.dtype), out=out)
    v = torch.sub(1.0, spike, out=out).mul_(h)
    return v.add_(spike, alpha=cfg.v_reset) if cfg.v_reset != 0.0 else v


def _dh_dk(cfg: _Neuron, charged: torch.Tensor, spike: Optional[torch.Tensor], v_init: torch.Tensor,
           x_seq: Optional[torch.Tensor]) -> torch.Tensor:
    """PLIF's ``dH[t]/dk`` for every step, with ``V[t-1]`` held constant: ``X[t] - (V[t-1] - V_reset)`` with
    ``decay_input``, else ``-(V[t-1] - V_reset)``; ``V[t-1]`` is the reset of ``H[t-1]`` (``v_init`` at
    t=0) with ``spike`` (None: taken again from ``H``). One new ``[T, N, ...]`` buffer, no other
    temporaries where the spikes are Heaviside and the reset soft."""
    out = torch.empty_like(charged)
    out[0] = v_init
    if charged.shape[0] > 1:
        previous = spike[:-1] if spike is not None else None
        if previous is None:
            # a soft Heaviside reset is one add that reads each spike once: the spikes can go where V goes
            into_out = cfg.heaviside and cfg.v_reset is None
            previous = out[1:] if into_out else torch.empty_like(charged[:-1])
            cfg.fire(charged[:-1], out=previous)
        _reset(cfg, charged[:-1], previous, out=out[1:])
    if cfg.reset_value != 0.0:
        out.sub_(cfg.reset_value)
    return torch.sub(x_seq, out, out=out) if cfg.decay_input else out.neg_()


_SECOND_ORDER = (
    "the fused SLTT neuron of snn-localrules has a first-order backward only, so a gradient of this gradient "
    "(backward or autograd.grad with create_graph=True, e.g. a gradient penalty) cannot go through it: wrap "
    "with slr.wrap(model, rule='sltt', fused=False), which steps the neuron with autograd"
)


def _first_order_only(backward: Callable) -> Callable:
    """``torch.autograd.function.once_differentiable`` with an error that says what to do: the backward runs
    without grad, and under ``create_graph=True`` its results lead to a node that raises on a second
    backward."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        raise_later = torch._C._functions.DelayedError(_SECOND_ORDER.encode(), len(outputs))

        def alias(value: Any) -> Any:
            return None if value is None else value.detach().requires_grad_()

        return raise_later(*[alias(v) for v in outputs])

    return wrapper


class SLTTMultiStep(torch.autograd.Function):
    """``(x_seq, v_init, w) -> (spike_seq, v_final, v_seq)`` with SLTT's elementwise backward.

    Use :func:`sltt_multi_step`, which checks the arguments. ``v_seq`` is ``None`` unless
    ``cfg.store_v_seq``. No gradient flows to ``v_init`` (SLTT cuts it).
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, v_init: torch.Tensor, w: Optional[torch.Tensor], cfg: _Neuron,
                v_fill: Optional[float] = None):
        ctx.set_materialize_grads(False)
        k = w.sigmoid() if cfg.kind == "plif" else None
        ctx.plif_grad = cfg.kind == "plif" and w is not None and ctx.needs_input_grad[2]
        # a neuron fed by a batch norm keeps no H (see norm_recompute), and neither does a PLIF neuron with
        # decay_input whose w needs a gradient: it keeps its input for d H / d k (X[t] - (V[t-1] - V_reset)),
        # from which backward charges H again (unless recharging is off: recompute_membrane=False); then H
        # is one step's buffer at a time
        pending = pending_source(x_seq)
        from_input = pending is None and ctx.plif_grad and cfg.decay_input and recharge_allowed()
        if cfg.backend == "cupy":
            spikes, v, charged, v_seq = sltt_cuda.forward(
                cfg.kind, x_seq, v_init, k, tau=cfg.tau, decay_input=cfg.decay_input, v_threshold=cfg.v_threshold,
                v_reset=cfg.v_reset, keep_h=pending is None and not from_input, store_v_seq=cfg.store_v_seq)
        else:
            spikes = torch.empty_like(x_seq)
            one_step = pending is not None or from_input
            charged = None if one_step else torch.empty_like(x_seq)
            scratch = torch.empty_like(x_seq[0]) if one_step else None  # H, one step at a time
            v_seq = torch.empty_like(x_seq) if cfg.store_v_seq else None
            v = v_init
            for t in range(x_seq.shape[0]):
                h = charged[t] if charged is not None else scratch  # _reset below makes v a new tensor
                _charge(cfg, x_seq[t], v, k, out=h)
                cfg.fire(h, out=spikes[t])
                v = _reset(cfg, h, spikes[t])
                if v_seq is not None:
                    v_seq[t] = v
        ctx.cfg = cfg
        ctx.v_fill = v_fill  # v_init is this number everywhere (the state's first call): kept as the number
        ctx.norm = None
        if pending is not None:
            # the input is a batch norm's output: keep what rebuilds it (the norm's own saved input) and the
            # spikes (which the next layer keeps anyway) instead of H; backward charges again
            source, packer = pending
            if packer is not None:
                packer.register(spikes)  # before it is saved: packed once, shared with the next layer
            ctx.norm = (source.eps, source.channel_dim, x_seq.shape)
            # backward charges again with the forward's spikes in the resets between steps, and a hard
            # reset's route to V needs them at the last step too; one step with a soft reset needs none
            keep_spikes = x_seq.shape[0] > 1 or cfg.v_reset is not None
            ctx.save_for_backward(*source.tensors(), spikes if keep_spikes else None,
                                  v_init if v_fill is None else None, k)
            return spikes, v, v_seq
        # the input is needed only for PLIF's d H / d k with decay_input (X[t] - (V[t-1] - V_reset))
        keep_x = ctx.plif_grad and cfg.decay_input
        keep_v = ctx.plif_grad and v_fill is None
        ctx.save_for_backward(charged, v_init if keep_v else None, x_seq if keep_x else None, k)
        return spikes, v, v_seq

    @staticmethod
    @_first_order_only  # the elementwise backward works in place; no double backward
    def backward(ctx, grad_spikes, grad_v, grad_v_seq):
        cfg: _Neuron = ctx.cfg
        if cfg.backend == "cupy":
            return SLTTMultiStep._kernel_backward(ctx, grad_spikes, grad_v, grad_v_seq)
        charged, x_seq, v_init, spikes, k = SLTTMultiStep._restore(ctx)
        disposable = False
        if charged is None:
            if ctx.plif_grad and cfg.decay_input:  # X stays for d H / d k; H in a buffer of its own
                charged, disposable = _charge_again(cfg, x_seq, v_init, k, spikes, torch.empty_like(x_seq)), True
            else:  # H overwrites the rebuilt input, which nothing else needs: one [T, N, ...] buffer
                charged, x_seq, disposable = _charge_again(cfg, x_seq, v_init, k, spikes, x_seq), None, True
        grad_x, grad_w = sltt_multi_step_backward(
            cfg, charged, grad_spikes, grad_v, grad_v_seq, k=k, v_init=v_init, x_seq=x_seq,
            need_grad_w=ctx.plif_grad, spikes=spikes, charged_disposable=disposable,
        )
        if grad_x is not None and not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, None, grad_w, None, None

    @staticmethod
    def _restore(ctx):
        """``(H or None, X or None, v_init, spikes or None, k)`` from what forward saved: H was kept, or
        (a batch-norm-fed neuron) X is rebuilt and H must be charged again with the forward's spikes.
        ``v_init`` is filled from its number where backward needs it (charging again, PLIF's w)."""
        if ctx.norm is not None:
            eps, dim, shape = ctx.norm
            *norm_saved, spikes, v_init, k = ctx.saved_tensors
            charged, x_seq = None, NormSource.rebuild(tuple(norm_saved), eps, dim).view(shape)
        else:
            charged, v_init, x_seq, k = ctx.saved_tensors
            spikes = None  # the backward takes them again from H, bit for bit
        if v_init is None and (charged is None or ctx.plif_grad):
            v_init = torch.full_like((charged if charged is not None else x_seq)[0], ctx.v_fill)
        return charged, x_seq, v_init, spikes, k

    @staticmethod
    def _kernel_backward(ctx, grad_spikes, grad_v, grad_v_seq):
        cfg: _Neuron = ctx.cfg
        if grad_spikes is None and grad_v is None and grad_v_seq is None:
            return None, None, None, None, None
        charged, x_seq, v_init, spikes, k = SLTTMultiStep._restore(ctx)
        surrogate, alpha = cfg.kernel_surrogate
        grad_x, grad_k = sltt_cuda.backward(
            cfg.kind, h_seq=charged, x_seq=x_seq, v_init=v_init, spikes=spikes, k=k, grad_spikes=grad_spikes,
            grad_v_seq=grad_v_seq, grad_v=grad_v, need_grad_k=ctx.plif_grad, tau=cfg.tau,
            decay_input=cfg.decay_input, v_threshold=cfg.v_threshold, v_reset=cfg.v_reset,
            detach_reset=cfg.detach_reset, surrogate=surrogate, alpha=alpha)
        grad_w = (grad_k * k * (1.0 - k)).to(k.dtype) if grad_k is not None else None
        return (grad_x if ctx.needs_input_grad[0] else None), None, grad_w, None, None


def _charge_again(cfg: _Neuron, x_seq: torch.Tensor, v_init: torch.Tensor, k: Optional[torch.Tensor],
                  spikes: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """H of every step, into ``out`` (which may be ``x_seq``: step t reads X[t] before writing H[t]), from
    the input and the forward's spikes: the forward's recurrence, with the saved spikes in the resets (a
    rebuilt H within rounding of the threshold cannot fire differently). ``spikes`` None: the input is the
    forward's own, so the same operations give the same H, and each step's spikes are taken again from it;
    or there is one step, whose H needs no reset."""
    v, last = v_init, x_seq.shape[0] - 1
    fired = torch.empty_like(x_seq[0]) if spikes is None and last > 0 else None
    for t in range(last + 1):
        _charge(cfg, x_seq[t], v, k, out=out[t])
        if t == last:
            break  # the last step's reset feeds no H of this call
        if fired is not None:
            cfg.fire(out[t], out=fired)
        v = _reset(cfg, out[t], spikes[t] if fired is None else fired)
    return out


def sltt_multi_step_backward(
    cfg: _Neuron,
    charged: torch.Tensor,
    grad_spikes: Optional[torch.Tensor],
    grad_v: Optional[torch.Tensor],
    grad_v_seq: Optional[torch.Tensor],
    k: Optional[torch.Tensor] = None,
    v_init: Optional[torch.Tensor] = None,
    x_seq: Optional[torch.Tensor] = None,
    need_grad_w: bool = False,
    spikes: Optional[torch.Tensor] = None,
    charged_disposable: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The SLTT gradient of one multi-step call, all T steps at once.

    :param charged: ``H``, the membrane after charging and before the spike, ``[T, N, ...]``.
    :param grad_spikes: dL/ds, ``[T, N, ...]`` or ``None``.
    :param grad_v: dL/dV[T-1] (the final membrane), ``[N, ...]`` or ``None``.
    :param grad_v_seq: dL/dV, ``[T, N, ...]`` or ``None``.
    :param k: PLIF's ``sigmoid(w)`` (0-dim).
    :param v_init: the membrane entering step 0 (PLIF's w gradient only).
    :param x_seq: the input (PLIF's w gradient with ``decay_input`` only).
    :param spikes: the forward's spikes, when ``charged`` was rebuilt (else taken again from ``charged``).
    :param charged_disposable: ``charged`` is the caller's scratch buffer: the common case computes the
        surrogate's derivative in it instead of in a new one.
    :return: ``(dL/dX [T, N, ...] or None, dL/dw (0-dim) or None)``; the w gradient is the sum over
        t of the per-step gradients with ``V[t-1]`` held constant.
    """
    grad_v_all = grad_v_seq
    if grad_v is not None:
        grad_v_all = torch.zeros_like(charged) if grad_v_all is None else grad_v_all.clone()
        grad_v_all[-1] += grad_v
    if grad_spikes is None and grad_v_all is None:
        return None, None

    # dL/ds collects the spike's own gradient and, unless the reset is detached, the reset's
    grad_s = grad_spikes
    if grad_v_all is not None and not cfg.detach_reset:
        dv_ds = -cfg.v_threshold if cfg.v_reset is None else cfg.v_reset - charged
        from_v = grad_v_all * dv_ds
        grad_s = from_v if grad_s is None else grad_s + from_v

    # the spikes (the forward's when H was rebuilt, else taken again from H) where the hard reset's route
    # or PLIF's w needs them; PLIF's dH/dk before H may be overwritten below
    spike = spikes
    if spike is None and grad_v_all is not None and cfg.v_reset is not None:
        spike = torch.empty_like(charged)
        cfg.fire(charged, out=spike)
    dh_dk = _dh_dk(cfg, charged, spike, v_init, x_seq) if need_grad_w else None

    if grad_s is None:
        grad_h = torch.zeros_like(charged)
    elif cfg.surrogate_derivative is not None:
        # in place in one buffer: the only [T, N, ...] temporary of the common case; none when H is scratch
        # and nothing below reads it again
        in_place = charged_disposable and grad_v_all is None
        z = charged.sub_(cfg.v_threshold) if in_place else charged - cfg.v_threshold
        grad_h = cfg.surrogate_derivative(z).mul_(grad_s)
    else:
        # one autograd call of the surrogate over all steps gives its derivative, whatever surrogate it is
        with torch.enable_grad():
            z = (charged - cfg.v_threshold).requires_grad_(True)
            surrogate_spikes = cfg.surrogate_function(z)
        (grad_h,) = torch.autograd.grad(surrogate_spikes, z, grad_outputs=grad_s.to(surrogate_spikes.dtype))
        if grad_h.untyped_storage().data_ptr() == grad_s.untyped_storage().data_ptr():
            grad_h = grad_h.clone()  # a pass-through surrogate: the buffer below must be our own
        del z, surrogate_spikes
    if grad_v_all is not None:  # the direct route H -> V
        grad_h += grad_v_all if cfg.v_reset is None else grad_v_all * (1.0 - spike)

    grad_w = None
    if dh_dk is not None:
        grad_k = dh_dk.mul_(grad_h).sum()
        grad_w = (grad_k * k * (1.0 - k)).to(k.dtype)

    if cfg.kind == "lif" and cfg.decay_input:
        grad_h /= cfg.tau  # grad_h is this function's own buffer
    elif cfg.kind == "plif" and cfg.decay_input:
        grad_h *= k
    return grad_h, grad_w


def _kernel_surrogate(function: Any) -> Optional[Tuple[str, float]]:
    """``(class name, alpha)`` of a SpikingJelly surrogate in spiking mode that the CUDA kernels know."""
    name, alpha = type(function).__name__, getattr(function, "alpha", None)
    if name not in sltt_cuda.SURROGATE_IDS or not type(function).__module__.startswith("spikingjelly."):
        return None
    if not getattr(function, "spiking", True) or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return name, float(alpha)


def sltt_multi_step(
    x_seq: torch.Tensor,
    v: Union[torch.Tensor, float],
    neuron: str = "lif",
    *,
    surrogate_function: SurrogateFunction,
    tau: float = 2.0,
    w: Optional[torch.Tensor] = None,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    detach_reset: bool = False,
    store_v_seq: bool = False,
    surrogate_derivative: Optional[SurrogateDerivative] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run a multi-step IF / LIF / ParametricLIF neuron over all T steps with SLTT's gradient.

    Forward is SpikingJelly 2.0's neuron exactly (see the module docstring). Backward is SLTT's: the
    membrane carried into each step is a constant, so ``dL/dX[t]`` depends on step t alone and is computed
    for all steps at once; PLIF's ``w`` gets the sum over t of its per-step gradients. Only ``H``
    (``[T, N, ...]``, the input's dtype) is kept for backward; for PLIF with ``decay_input`` when ``w``
    needs a gradient, ``x_seq`` instead (``dH/dk`` needs it; backward charges ``H`` again from it; both
    inside a :func:`~snn_localrules.functional.norm_recompute.rebuild_input_from` with ``recharge=False``,
    as the SLTT rule's ``recompute_membrane=False`` asks); nothing of its own inside
    :func:`~snn_localrules.functional.norm_recompute.rebuild_input_from` when ``x_seq`` is that batch norm's
    output (the SLTT rule does this for batch-norm-fed neurons): then backward charges again.

    :param x_seq: input current ``[T, N, ...]`` (float16/bfloat16/float32/float64).
    :param v: membrane entering step 0, ``[N, ...]`` or a float (filled); cast to ``x_seq``'s dtype. Its
        gradient is cut (it is the carried state).
    :param neuron: ``"if"``, ``"lif"`` or ``"plif"``.
    :param surrogate_function: spike function with a surrogate gradient, e.g. any
        ``spikingjelly.activation_based.surrogate`` object: Heaviside forward, its derivative is taken
        through its own autograd backward over all T at once. It must be deterministic (it is evaluated
        again in backward).
    :param tau: LIF's membrane time constant.
    :param w: PLIF's learnable parameter (0-dim tensor, ``tau = 1 / sigmoid(w)``).
    :param decay_input: LIF/PLIF: the input is scaled by ``1/tau`` too.
    :param v_threshold: firing threshold.
    :param v_reset: hard-reset value, or ``None`` for soft reset (subtract the threshold).
    :param detach_reset: cut the reset's gradient (matters only for gradients of ``v`` and ``v_seq``).
    :param store_v_seq: also return the membrane after reset of every step, ``[T, N, ...]``.
    :param surrogate_derivative: optional closed form of the surrogate's derivative, ``z -> sg(z)``,
        computed in place in the buffer it is given; backward then needs one ``[T, N, ...]`` temporary
        instead of the several that an autograd call of the surrogate allocates. It must equal the
        surrogate's own backward (the SpikingJelly adapter passes tested formulas for its surrogates).
    :param backend: ``"auto"`` (default): ``"cupy"`` for a CUDA tensor when CuPy is installed and the
        kernels know the surrogate, else ``"torch"``. ``"torch"`` (CPU and CUDA), or ``"cupy"``: the CUDA kernels of
        :mod:`snn_localrules.kernels.sltt_cuda` (one thread per neuron, all T inside; compiled by CuPy on
        first use), for CUDA tensors and the SpikingJelly surrogates they know. Their arithmetic is tested
        against this torch path on the CPU (built as C++); on a GPU by ``tests/test_sltt_cuda.py``.
    :return: ``(spike_seq [T, N, ...], v_final [N, ...], v_seq [T, N, ...] or None)``.

    Example::

        >>> from spikingjelly.activation_based import surrogate
        >>> x = torch.randn(8, 32, 100, requires_grad=True)
        >>> s, v, _ = sltt_multi_step(x, 0.0, "lif", tau=2.0, surrogate_function=surrogate.ATan())
        >>> s.sum().backward()      # x.grad[t] = ds[t]/dH[t] / tau, step by step, no time loop
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    kernel_surrogate = _kernel_surrogate(surrogate_function)
    if backend == "auto":
        on_gpu = kernel_surrogate is not None and sltt_cuda.runs_on(x_seq) and x_seq.dtype in sltt_cuda.DTYPES
        # kernels that do not compile on this machine are warned about once; the torch path runs
        backend = "cupy" if on_gpu and sltt_cuda.compile_error(x_seq) is None else "torch"
    elif backend == "cupy":  # asked for: say why it cannot run (auto chose it only where it can)
        if kernel_surrogate is None:
            raise BackendError(
                f"backend='cupy' computes the surrogate's derivative in the kernel; it knows SpikingJelly's "
                f"{', '.join(sltt_cuda.SURROGATE_IDS)} (spiking mode, a number alpha), not "
                f"{type(surrogate_function).__name__}. Use backend='torch' for this surrogate."
            )
        if not sltt_cuda.runs_on(x_seq):
            raise BackendError(
                "backend='cupy' runs CUDA kernels through CuPy, which need a CUDA tensor (got one on "
                f"{getattr(x_seq, 'device', '?')}) and CuPy (`pip install snn-localrules[cupy]`, or the cupy-cudaXXx "
                "wheel of your CUDA). "
                "Use backend='torch' (it runs on CPU and CUDA)."
            )
        if x_seq.dtype in sltt_cuda.DTYPES:
            error = sltt_cuda.compile_error(x_seq)
            if error is not None:
                raise BackendError(
                    f"backend='cupy': the CUDA kernels did not compile for {x_seq.dtype} on this machine "
                    f"({error[:500]}). Use backend='torch' (the same results), or check that CuPy finds "
                    "your CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h)."
                )
    if neuron not in NEURON_KINDS:
        raise ValueError(f"neuron must be one of {NEURON_KINDS}, got {neuron!r}.")
    if not isinstance(x_seq, torch.Tensor) or x_seq.ndim < 1 or not x_seq.is_floating_point():
        raise ValueError(
            f"x_seq must be a floating-point tensor [T, N, ...], got "
            f"{getattr(x_seq, 'dtype', type(x_seq).__name__)} of shape {tuple(getattr(x_seq, 'shape', ()))}."
        )
    if x_seq.shape[0] == 0:
        raise ValueError("x_seq has no time steps (shape[0] == 0).")
    if not callable(surrogate_function):
        raise TypeError(f"surrogate_function must be callable, got {type(surrogate_function).__name__}.")
    if neuron == "lif" and not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau!r}.")
    if neuron == "plif" and not (isinstance(w, torch.Tensor) and w.ndim == 0):
        raise ValueError(f"neuron='plif' needs w, a 0-dim tensor (tau = 1/sigmoid(w)); got {w!r}.")
    if isinstance(v, torch.Tensor):
        if v.shape != x_seq.shape[1:]:
            raise ValueError(f"v has shape {tuple(v.shape)}, but one step of x_seq has {tuple(x_seq.shape[1:])}.")
        v_init, v_fill = v.detach().to(dtype=x_seq.dtype, device=x_seq.device), None
    else:
        v_fill = float(v)
        v_init = torch.full_like(x_seq[0], v_fill)
    cfg = _Neuron(
        kind=neuron, tau=float(tau), decay_input=bool(decay_input), v_threshold=float(v_threshold),
        v_reset=None if v_reset is None else float(v_reset), detach_reset=bool(detach_reset),
        store_v_seq=bool(store_v_seq), surrogate_function=surrogate_function,
        surrogate_derivative=surrogate_derivative, backend=backend,
        kernel_surrogate=kernel_surrogate if backend == "cupy" else None, heaviside=kernel_surrogate is not None,
    )
    return SLTTMultiStep.apply(x_seq, v_init, w if neuron == "plif" else None, cfg, v_fill)
