"""The fused multi-step SLTT neuron (snn_localrules.functional.sltt_multistep) and its use by the SLTT rule.

* Forward: equal to SpikingJelly 2.0's own multi-step IFNode / LIFNode / ParametricLIFNode, spikes bit for
  bit, membranes (``v`` and ``v_seq``) to 1e-6; float32 (SpikingJelly's registered-op path for built-in
  surrogates), float64 and a non-built-in surrogate (its pure-torch reference path), float16/bfloat16.
* Backward: equal (1e-5 relative) to a per-step reference written here with plain autograd: the neuron
  equations by hand, a loop over t, the carried membrane detached before each step, the same surrogate
  object. Input gradient, PLIF's ``w`` gradient, and gradients reaching the membrane outputs, for every
  combination of neuron x reset x decay_input x detach_reset and three surrogates.
* Integration: ``slr.wrap(model, rule="sltt")`` gives the same outputs and gradients with ``fused`` on and
  off, actually uses the fused node when on, and steps the neurons it cannot prove equal.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional, layer, surrogate  # noqa: E402

import snn_localrules as slr  # noqa: E402
from snn_localrules.errors import BackendError  # noqa: E402
from snn_localrules.adapters.spikingjelly import surrogate_derivative  # noqa: E402
from snn_localrules.functional.sltt_multistep import sltt_multi_step  # noqa: E402

T, B, N = 7, 3, 11
THRESHOLD = 1.0

SURROGATES = {
    "sigmoid": lambda: surrogate.Sigmoid(alpha=4.0),  # built in: SpikingJelly's registered-op path
    "atan": lambda: surrogate.ATan(alpha=2.0),  # built in
    "pwlrelu": lambda: surrogate.PiecewiseLeakyReLU(w=1.0, c=0.01),  # SpikingJelly's torch reference path
}


def _configs():
    """(kind, v_reset, decay_input, detach_reset) for every combination the neurons have."""
    out = []
    for kind in ("if", "lif", "plif"):
        decays = (True,) if kind == "if" else (True, False)
        for v_reset, decay, detach in itertools.product((0.0, None), decays, (False, True)):
            out.append((kind, v_reset, decay, detach))
    return out


CONFIGS = _configs()


# hundreds of tiny cases: one intra-op thread (conftest.one_intra_op_thread)
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _config_id(cfg):
    kind, v_reset, decay, detach = cfg
    reset = "hard" if v_reset is not None else "soft"
    parts = [kind, reset] + ([] if kind == "if" else [f"decay{int(decay)}"]) + [f"detach{int(detach)}"]
    return "-".join(parts)


TAU = 2.0
INIT_TAU = 1.6  # PLIF: w = -log(tau - 1)


def sj_node(kind, v_reset, decay, detach, sg, store_v_seq=False):
    common = dict(v_threshold=THRESHOLD, v_reset=v_reset, surrogate_function=sg, detach_reset=detach,
                  step_mode="m", store_v_seq=store_v_seq)
    if kind == "if":
        return sj_neuron.IFNode(**common)
    if kind == "lif":
        return sj_neuron.LIFNode(tau=TAU, decay_input=decay, **common)
    return sj_neuron.ParametricLIFNode(init_tau=INIT_TAU, decay_input=decay, **common)


def fused(kind, x, v0, decay, v_reset, detach, sg, w=None, store_v_seq=False, derivative=None):
    return sltt_multi_step(x, v0, kind, surrogate_function=sg, tau=TAU, w=w, decay_input=decay,
                           v_threshold=THRESHOLD, v_reset=v_reset, detach_reset=detach, store_v_seq=store_v_seq,
                           surrogate_derivative=derivative)


def make_input(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mean drive near threshold so that a good share of neurons fires and a good share does not
    return (torch.randn(T, B, N, generator=g, dtype=torch.float64) * 1.2 + 0.7).to(dtype)


def plif_w(dtype=torch.float64):
    return torch.tensor(-math.log(INIT_TAU - 1.0), dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# the independent per-step SLTT reference
# ------------------------------------------------------------------------------------------------------
def reference_sltt(kind, x, v0, decay, v_reset, detach, sg, w=None):
    """Plain autograd, one step at a time; the membrane carried into each step is detached (SLTT)."""
    k = torch.sigmoid(w) if kind == "plif" else None
    r = 0.0 if v_reset is None else v_reset
    v = v0
    spikes, voltages = [], []
    for t in range(x.shape[0]):
        v = v.detach()  # the temporal route is cut
        if kind == "if":
            h = v + x[t]
        else:
            leak = (1.0 / TAU) if kind == "lif" else k
            h = v + (x[t] - (v - r)) * leak if decay else v - (v - r) * leak + x[t]
        s = sg(h - THRESHOLD)
        s_reset = s.detach() if detach else s
        v = h - s_reset * THRESHOLD if v_reset is None else s_reset * v_reset + (1.0 - s_reset) * h
        spikes.append(s)
        voltages.append(v)
    return torch.stack(spikes), v, torch.stack(voltages)


def _spike_rate_ok(spikes):
    rate = float(spikes.float().mean())
    assert 0.05 < rate < 0.95, f"spike rate {rate}: the comparison would be vacuous"


# ------------------------------------------------------------------------------------------------------
# forward: equal to SpikingJelly's own multi-step neuron
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,store_v_seq", [(torch.float32, False), (torch.float32, True), (torch.float64, True)],
                         ids=["fp32-v", "fp32-v_seq", "fp64-v_seq"])
@pytest.mark.parametrize("sg_name", sorted(SURROGATES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_forward_equals_spikingjelly(cfg, sg_name, dtype, store_v_seq):
    kind, v_reset, decay, detach = cfg
    sg = SURROGATES[sg_name]()
    node = sj_node(kind, v_reset, decay, detach, sg, store_v_seq=store_v_seq).to(dtype)
    x = make_input(dtype)
    v0 = (make_input(dtype, seed=1)[0] * 0.5).clone()
    node.v = v0.clone()
    with torch.no_grad():
        ref_spikes = node(x)
    w = node.w.detach() if kind == "plif" else None
    spikes, v, v_seq = fused(kind, x, v0, decay, v_reset, detach, sg, w=w, store_v_seq=store_v_seq)
    _spike_rate_ok(spikes)
    assert spikes.dtype == ref_spikes.dtype and spikes.shape == ref_spikes.shape
    assert torch.equal(spikes, ref_spikes), "spikes differ from SpikingJelly's"
    torch.testing.assert_close(v, node.v, rtol=0, atol=1e-6)
    if store_v_seq:
        torch.testing.assert_close(v_seq, node.v_seq, rtol=0, atol=1e-6)
    else:
        assert v_seq is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_forward_half_precision_equals_spikingjelly(kind, dtype):
    sg = surrogate.Sigmoid()
    node = sj_node(kind, None, True, True, sg, store_v_seq=True)
    x = make_input(dtype)
    with torch.no_grad():
        ref_spikes = node(x)
    w = node.w.detach() if kind == "plif" else None
    spikes, v, v_seq = fused(kind, x, 0.0, True, None, True, sg, w=w, store_v_seq=True)
    _spike_rate_ok(spikes)
    assert spikes.dtype == dtype and torch.equal(spikes, ref_spikes)
    assert torch.equal(v, node.v) and torch.equal(v_seq, node.v_seq)


def _neighbours(theta: torch.Tensor):
    """The values of ``theta``'s dtype just above and just below it (positive ``theta``): one unit in the
    last place either side, from the bits (torch 2.1's CPU nextafter has no half precision)."""
    if theta.dtype in (torch.float16, torch.bfloat16):
        bits = theta.view(torch.int16)
        return (bits + 1).view(theta.dtype), (bits - 1).view(theta.dtype)
    return torch.nextafter(theta, torch.ones_like(theta)), torch.nextafter(theta, torch.zeros_like(theta))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("v_reset", [None, 0.0, -0.1], ids=["soft", "hard0", "hard-0.1"])
@pytest.mark.parametrize("kind,decay", [("if", True), ("lif", True), ("lif", False), ("plif", False)])
def test_forward_equals_spikingjelly_with_thresholds_the_dtype_cannot_hold(kind, decay, v_reset, dtype):
    # the fused forward compares H with the threshold and resets with one add; SpikingJelly subtracts the
    # threshold first and resets with products: the same numbers in every dtype, also for a threshold
    # (0.3) and a reset (-0.1) that the dtype cannot hold and for H at the threshold or one step beside it
    sg = surrogate.Sigmoid()
    common = dict(v_threshold=0.3, v_reset=v_reset, surrogate_function=sg, detach_reset=True, step_mode="m",
                  store_v_seq=True)
    node = (sj_neuron.IFNode(**common) if kind == "if" else
            sj_neuron.LIFNode(tau=TAU, decay_input=decay, **common) if kind == "lif" else
            sj_neuron.ParametricLIFNode(init_tau=INIT_TAU, decay_input=decay, **common))
    if not callable(getattr(node, "materialize_states", None)) and not decay and v_reset in (None, 0.0):
        pytest.skip("SpikingJelly before 2.0 charges v * (1 - k) + x here, another rounding: the wrapper "
                    "steps such neurons (adapters/spikingjelly.py, _older_forward_matches)")
    x = make_input(dtype) * 0.5
    if v_reset in (None, 0.0):
        # step 0 charges H = X (/ tau for LIF with decay_input) from zero: some H exactly at the threshold
        # as the dtype holds it, and one step of the dtype either side
        theta = torch.tensor(0.3, dtype=dtype)
        boundary = torch.stack((theta, *_neighbours(theta))) * (2 if kind == "lif" and decay else 1)
        x[0, 0, :3] = boundary
    with torch.no_grad():
        ref_spikes = node(x)
    if v_reset in (None, 0.0):
        assert ref_spikes[0, 0, :3].tolist() == [1, 1, 0]
    spikes, v, v_seq = sltt_multi_step(  # SpikingJelly's membrane starts at v_reset
        x, 0.0 if v_reset is None else v_reset, kind, surrogate_function=sg, tau=TAU, w=node.w.detach() if kind == "plif" else None,
        decay_input=decay, v_threshold=0.3, v_reset=v_reset, detach_reset=True, store_v_seq=True)
    _spike_rate_ok(spikes)
    assert torch.equal(spikes, ref_spikes), "spikes differ from SpikingJelly's"
    assert torch.equal(v_seq, node.v_seq) and torch.equal(v, node.v), "membranes differ from SpikingJelly's"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("v_reset", [None, -0.1], ids=["soft", "hard-0.1"])
def test_torch_path_rounds_a_threshold_as_spikingjellys_operations_do(v_reset, dtype, device):
    # SpikingJelly's torch operations, written out step by step on the same device, against the fused
    # function's torch path: in half precision a fused add may take its scalar in float32 (CUDA does) where
    # SpikingJelly's product rounds the threshold to the dtype first; the fused path must round it too
    sg = surrogate.Sigmoid()
    x = make_input(dtype) * 0.5
    if v_reset is None:  # H = X / tau at step 0: some H at the threshold as the dtype holds it, and beside it
        theta = torch.tensor(0.3, dtype=dtype)
        x[0, 0, :3] = torch.stack((theta, *_neighbours(theta))) * TAU
    x = x.to(device)
    r = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x[0], r)
    spikes, voltages = [], []
    for t in range(T):
        h = v + (x[t] - (v - r)) / TAU if r else v + (x[t] - v) / TAU
        s = (h - 0.3 >= 0).to(dtype)
        v = h - s * 0.3 if v_reset is None else s * v_reset + (1.0 - s) * h
        spikes.append(s)
        voltages.append(v)
    got, _, v_seq = sltt_multi_step(x, r, "lif", surrogate_function=sg, tau=TAU, v_threshold=0.3, v_reset=v_reset,
                                    detach_reset=True, store_v_seq=True, backend="torch")
    _spike_rate_ok(got)
    assert torch.equal(got, torch.stack(spikes)) and torch.equal(v_seq, torch.stack(voltages))


# ------------------------------------------------------------------------------------------------------
# backward: equal to the per-step reference
# ------------------------------------------------------------------------------------------------------
def _grads(kind, x, w, run, use_v_outputs, seed=2):
    """Run ``run(x, w) -> (spikes, v, v_seq)``, backpropagate random weights on the outputs, return grads."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True) if w is not None else None
    spikes, v, v_seq = run(x, w)
    g = torch.Generator().manual_seed(seed)
    loss = (spikes * torch.randn(spikes.shape, generator=g, dtype=torch.float64).to(spikes.dtype)).sum()
    if use_v_outputs:
        loss = loss + (v_seq * torch.randn(v_seq.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
        loss = loss + (v * torch.randn(v.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
    loss.backward()
    return spikes.detach(), x.grad, (w.grad if w is not None else None)


def _assert_rel_close(actual, expected, name, rtol=1e-5):
    scale = float(expected.abs().max())
    assert scale > 0, f"{name}: reference gradient is all zero, the comparison would be vacuous"
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol} x max |reference| {scale:.3g}"


@pytest.mark.parametrize(
    "dtype,use_v_outputs,closed_form",
    [(torch.float32, True, True), (torch.float64, False, False), (torch.float64, True, False),
     (torch.float64, False, True)],
    ids=["fp32-spikes+v-closed", "fp64-spikes-autograd", "fp64-spikes+v-autograd", "fp64-spikes-closed"])
@pytest.mark.parametrize("sg_name", sorted(SURROGATES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_backward_equals_per_step_reference(cfg, sg_name, dtype, use_v_outputs, closed_form):
    """``closed_form``: the surrogate's derivative from the adapter's in-place formula (None for
    PiecewiseLeakyReLU, which has none: autograd of the object again); else autograd of the object."""
    kind, v_reset, decay, detach = cfg
    sg = SURROGATES[sg_name]()
    derivative = surrogate_derivative(sg) if closed_form else None
    x = make_input(dtype)
    v0 = make_input(dtype, seed=1)[0] * 0.5
    w = plif_w(dtype) if kind == "plif" else None

    ref_spikes, ref_gx, ref_gw = _grads(
        kind, x, w, lambda x, w: reference_sltt(kind, x, v0, decay, v_reset, detach, sg, w=w), use_v_outputs)
    spikes, gx, gw = _grads(
        kind, x, w, lambda x, w: fused(kind, x, v0, decay, v_reset, detach, sg, w=w, store_v_seq=True,
                                       derivative=derivative),
        use_v_outputs)
    _spike_rate_ok(ref_spikes)
    assert torch.equal(spikes, ref_spikes)
    _assert_rel_close(gx, ref_gx, "input gradient")
    if kind == "plif":
        _assert_rel_close(gw.reshape(1), ref_gw.reshape(1), "w gradient")


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed", "autograd"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay1", "decay0"])
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_backward_with_a_nonzero_reset_value_equals_per_step_reference(kind, decay, closed_form):
    # V_reset = -0.1 enters the charge (V - V_reset), the hard reset and PLIF's dH/dk
    sg = surrogate.Sigmoid(alpha=4.0)
    x = make_input(torch.float64)
    v0 = make_input(torch.float64, seed=1)[0] * 0.5
    w = plif_w() if kind == "plif" else None
    ref_spikes, ref_gx, ref_gw = _grads(
        kind, x, w, lambda x, w: reference_sltt(kind, x, v0, decay, -0.1, False, sg, w=w), True)
    spikes, gx, gw = _grads(
        kind, x, w, lambda x, w: fused(kind, x, v0, decay, -0.1, False, sg, w=w, store_v_seq=True,
                                       derivative=surrogate_derivative(sg) if closed_form else None), True)
    _spike_rate_ok(ref_spikes)
    assert torch.equal(spikes, ref_spikes)
    _assert_rel_close(gx, ref_gx, "input gradient")
    if kind == "plif":
        _assert_rel_close(gw.reshape(1), ref_gw.reshape(1), "w gradient")


@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_backward_matches_spikingjelly_stepped_with_cut_state(kind):
    """A second, framework-side reference: SpikingJelly's own neuron run one step per call in
    single-step mode with its membrane detached before each step."""
    sg = surrogate.ATan()
    x = make_input(torch.float64)
    node = sj_node(kind, 0.0, True, False, sg).double()
    node.step_mode = "s"
    xs = x.clone().requires_grad_(True)
    outs = []
    for t in range(T):
        if isinstance(node.v, torch.Tensor):
            node.v = node.v.detach()
        outs.append(node(xs[t]))
    g = torch.randn(T, B, N, dtype=torch.float64)
    (torch.stack(outs) * g).sum().backward()
    ref_gw = node.w.grad.clone() if kind == "plif" else None

    xf = x.clone().requires_grad_(True)
    w = node.w.detach().clone().requires_grad_(True) if kind == "plif" else None
    spikes, _, _ = fused(kind, xf, 0.0, True, 0.0, False, sg, w=w)
    (spikes * g).sum().backward()
    _assert_rel_close(xf.grad, xs.grad, "input gradient")
    if kind == "plif":
        _assert_rel_close(w.grad.reshape(1), ref_gw.reshape(1), "w gradient")


@pytest.mark.parametrize("name,alpha", [
    ("Sigmoid", 4.0), ("Sigmoid", 1.5), ("ATan", 2.0), ("ATan", 3.0), ("PiecewiseQuadratic", 1.0),
    ("PiecewiseExp", 1.0), ("Erf", 2.0), ("SoftSign", 2.0), ("SuperSpike", 1.0)])
def test_closed_form_surrogate_derivatives_equal_spikingjelly(name, alpha):
    """The adapter's in-place derivative of each SpikingJelly surrogate equals the class's own backward."""
    if not hasattr(surrogate, name):
        pytest.skip(f"this SpikingJelly has no surrogate.{name}")
    sg = getattr(surrogate, name)(alpha=alpha)
    z = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64).requires_grad_(True)
    (expected,) = torch.autograd.grad(sg(z).sum(), z)
    derivative = surrogate_derivative(sg)
    assert derivative is not None
    buffer = z.detach().clone()
    torch.testing.assert_close(derivative(buffer), expected, rtol=1e-10, atol=1e-12)
    assert surrogate_derivative(getattr(surrogate, name)(alpha=alpha, spiking=False)) is None
    assert surrogate_derivative(surrogate.PiecewiseLeakyReLU()) is None


def test_sltt_gradient_differs_from_bptt():
    """The cut is real: the fused gradient is not SpikingJelly's BPTT gradient (τ=2, so the temporal
    route carries weight)."""
    sg = surrogate.Sigmoid()
    x = make_input(torch.float64)
    node = sj_node("lif", 0.0, True, False, sg).double()
    xb = x.clone().requires_grad_(True)
    g = torch.randn(T, B, N, dtype=torch.float64)
    (node(xb) * g).sum().backward()
    xf = x.clone().requires_grad_(True)
    spikes, _, _ = fused("lif", xf, 0.0, True, 0.0, False, sg)
    (spikes * g).sum().backward()
    assert float((xf.grad - xb.grad).abs().max()) > 1e-3 * float(xb.grad.abs().max())


def test_no_gradient_reaches_the_initial_membrane():
    v0 = torch.full((B, N), 0.3, dtype=torch.float64, requires_grad=True)
    x = make_input().requires_grad_(True)
    spikes, v, _ = fused("lif", x, v0, True, 0.0, False, surrogate.Sigmoid())
    (spikes.sum() + v.sum()).backward()
    assert v0.grad is None and x.grad is not None


def test_saves_only_the_charged_membrane():
    """For IF/LIF (and PLIF without a w gradient) backward keeps one [T, N, ...] tensor, H."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for kind in ("if", "lif", "plif"):
        saved.clear()
        x = make_input(torch.float32).requires_grad_(True)
        w = plif_w(torch.float32) if kind == "plif" else None  # no grad wanted for w
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fused(kind, x, 0.0, True, None, True, surrogate.Sigmoid(), w=w)
        big = [t for t in saved if t is not None and t.numel() > 1]
        assert [tuple(t.shape) for t in big] == [(T, B, N)], kind
        assert big[0].dtype == torch.float32
    # PLIF with decay_input and a w gradient keeps its input for d H / d k, and H not beside it: backward
    # charges H again from that input
    saved.clear()
    x = make_input(torch.float32).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikes, _, _ = fused("plif", x, 0.0, True, None, True, surrogate.Sigmoid(), w=plif_w(torch.float32).requires_grad_())
    big = [t for t in saved if t is not None and t.numel() > 1]
    assert len(big) == 1 and big[0] is x


def test_single_step_sequence():
    sg = surrogate.ATan()
    x = make_input()[:1]
    _, gx, _ = _grads("lif", x, None, lambda x, w: fused("lif", x, 0.0, True, 0.0, False, sg), False)
    _, ref, _ = _grads("lif", x, None, lambda x, w: reference_sltt("lif", x, torch.zeros(B, N, dtype=x.dtype),
                                                                    True, 0.0, False, sg), False)
    _assert_rel_close(gx, ref, "input gradient, T=1")


def test_backend_and_argument_errors():
    x = make_input()
    sg = surrogate.Sigmoid()
    with pytest.raises(BackendError, match=r"CUDA tensor.*pip install snn-localrules\[cupy\]"):
        sltt_multi_step(x, 0.0, "lif", surrogate_function=sg, backend="cupy")
    with pytest.raises(BackendError, match="derivative in the kernel.*PiecewiseLeakyReLU"):
        sltt_multi_step(x, 0.0, "lif", surrogate_function=surrogate.PiecewiseLeakyReLU(), backend="cupy")
    with pytest.raises(ValueError, match="backend must be one of"):
        sltt_multi_step(x, 0.0, "lif", surrogate_function=sg, backend="triton")
    with pytest.raises(ValueError, match="neuron must be one of"):
        sltt_multi_step(x, 0.0, "izhikevich", surrogate_function=sg)
    with pytest.raises(ValueError, match="needs w"):
        sltt_multi_step(x, 0.0, "plif", surrogate_function=sg)
    with pytest.raises(ValueError, match="v has shape"):
        sltt_multi_step(x, torch.zeros(B + 1, N), "lif", surrogate_function=sg)


# ------------------------------------------------------------------------------------------------------
# integration: slr.wrap(model, rule="sltt") in zero-change mode
# ------------------------------------------------------------------------------------------------------
def conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1, bias=False),
        layer.BatchNorm2d(6),
        sj_neuron.LIFNode(tau=2.0, v_reset=None, detach_reset=True, surrogate_function=surrogate.Sigmoid()),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(6 * 4 * 4, 24),
        sj_neuron.ParametricLIFNode(init_tau=1.5, surrogate_function=surrogate.ATan(), store_v_seq=True),
        layer.Linear(24, 12),
        sj_neuron.IFNode(),
        layer.Linear(12, 5),
    )
    functional.set_step_mode(model, "m")
    return model


def _zero_change_grads(model, x, y, fused_on):
    learner = slr.wrap(model, rule="sltt", fused=fused_on)
    try:
        out = model(x)
        loss = sum(nn.functional.cross_entropy(out[t], y) for t in range(x.shape[0])) / x.shape[0]
        loss = loss + 0.01 * model[6].v_seq.square().mean()  # a loss term on the stored membrane too
        loss.backward()
        functional.reset_net(model)
    finally:
        learner.unwrap()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_wrapped_gradients_identical_with_fused_on_and_off():
    model = conv_model()
    twin = copy.deepcopy(model)
    x = torch.rand(6, 4, 2, 8, 8) * 2.0
    y = torch.randint(0, 5, (4,))
    out_on, grads_on = _zero_change_grads(model, x, y, True)
    out_off, grads_off = _zero_change_grads(twin, x, y, False)
    assert torch.equal(out_on, out_off)
    nonzero = [n for n, g in grads_off.items() if float(g.abs().max()) > 0]
    assert "6.w" in nonzero and "0.weight" in nonzero, nonzero
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_wrap_uses_the_fused_node_only_when_on():
    model = conv_model()
    x = torch.rand(4, 2, 2, 8, 8)
    for fused_on, expected in ((True, "SLTTMultiStepBackward"), (False, None)):
        learner = slr.wrap(model, rule="sltt", fused=fused_on)
        try:
            out = model[:3](x)
            name = type(out.grad_fn).__name__
            assert (name == expected) if expected else (name != "SLTTMultiStepBackward"), name
        finally:
            functional.reset_net(model)
            learner.unwrap()


def test_neurons_not_proven_equal_are_stepped():
    """A subclass that changes the forward, and a random surrogate, fall back to the per-step path."""

    class OddLIF(sj_neuron.LIFNode):  # (one that defines its own multi_step_forward is refused: test_neurons)
        def forward(self, x, *args, **kwargs):
            return super().forward(x * 0.5, *args, **kwargs)

    class PlainSubclass(sj_neuron.LIFNode):
        pass

    class UserSurrogate(surrogate.Sigmoid):  # not SpikingJelly's own class: cannot be checked
        pass

    cases = [(OddLIF(tau=2.0), False), (PlainSubclass(tau=2.0), True),
             (sj_neuron.LIFNode(tau=2.0, surrogate_function=UserSurrogate()), False),
             # a random spike function (it would be drawn again in the fused backward); threshold 0 and
             # inputs in [0, 1) keep its Bernoulli probabilities valid
             *([(sj_neuron.LIFNode(tau=2.0, v_threshold=0.0, surrogate_function=surrogate.PoissonPass()), False)]
               if hasattr(surrogate, "PoissonPass") else [])]
    for node, should_fuse in cases:
        model = nn.Sequential(node)
        functional.set_step_mode(model, "m")
        learner = slr.wrap(model, rule="sltt")
        try:
            out = model(torch.rand(3, 2, 5, requires_grad=True))
            assert (type(out.grad_fn).__name__ == "SLTTMultiStepBackward") == should_fuse, type(node).__name__
        finally:
            learner.unwrap()


class _CheckpointedBlock(nn.Module):
    """conv -> BN -> neuron under torch.utils.checkpoint(use_reentrant=False) inside the user's model: the
    block is recomputed in backward, outside the learner's forward."""

    def __init__(self, kind):
        super().__init__()
        self.block = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4),
                                   sj_node(kind, None, True, False, surrogate.ATan()))
        self.head = nn.Sequential(layer.Flatten(), layer.Linear(4 * 6 * 6, 5))
        functional.set_step_mode(self, "m")

    def _block(self, x):
        functional.reset_net(self.block)  # the recomputation starts from the same state
        return self.block(x)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self._block, x, use_reentrant=False))


@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_a_checkpoint_inside_the_model_around_a_norm_fed_fused_neuron(kind):
    """The fused neuron keeps its membrane there (the recomputation saves the same tensors): the same
    gradients as the stepped neuron, where it failed with 'a different number of tensors was saved'."""
    torch.manual_seed(7)
    model = _CheckpointedBlock(kind)
    x = torch.rand(T, B, 1, 6, 6)
    grads = []
    for fused_on in (True, False):
        net = copy.deepcopy(model)
        learner = slr.wrap(net, rule="sltt", fused=fused_on)
        net(x).square().mean().backward()
        learner.unwrap()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_second_order_gradient_through_the_fused_neuron_says_to_step_it():
    torch.manual_seed(8)
    x = torch.rand(T, B, 12, requires_grad=True)
    for fused_on in (True, False):
        model = nn.Sequential(layer.Linear(12, 16), sj_node("lif", None, True, False, surrogate.ATan()),
                              layer.Linear(16, 5))
        functional.set_step_mode(model, "m")
        learner = slr.wrap(model, rule="sltt", fused=fused_on)
        loss = model(x).square().mean()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = loss + gx.square().sum()
        if fused_on:
            with pytest.raises(RuntimeError, match=r"first-order backward only.*create_graph=True.*fused=False"):
                penalty.backward()
        else:
            penalty.backward()
            assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
        learner.unwrap()


@pytest.mark.parametrize("with_norm", [False, True])
def test_a_neuron_with_a_smooth_output_is_stepped_and_its_output_never_packed(with_norm):
    """surrogate(spiking=False): the neuron outputs the smooth surrogate itself, not 0/1. It was fused and
    its output stored as 1-byte spikes: the next layer's gradient came out 0 (11.05 in the reference)."""
    torch.manual_seed(9)
    x = torch.rand(T, B, 12) * 2
    grads = []
    for fused_on in (True, False):
        torch.manual_seed(10)  # the same weights in both runs
        blocks = [layer.Linear(12, 16)] + ([layer.BatchNorm1d(16)] if with_norm else [])
        model = nn.Sequential(*blocks, sj_neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid(spiking=False)),
                              layer.Linear(16, 5))
        functional.set_step_mode(model, "m")
        if with_norm:  # SpikingJelly 2.0's multi-step BatchNorm1d takes [T, N, C] through SeqToANNContainer
            model[1] = layer.SeqToANNContainer(nn.BatchNorm1d(16))
        learner = slr.wrap(model, rule="sltt", fused=fused_on)
        model(x).square().mean().backward()
        if fused_on:
            assert learner.packer is None or learner.packer.packed_bytes == 0
        learner.unwrap()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):  # both stepped (to rounding: SpikingJelly 0.0.0.0.14 differs at 1e-10)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert grads[0][-2].norm() > 0


def test_fused_option_is_validated():
    with pytest.raises(ValueError, match="fused must be True or False"):
        slr.wrap(conv_model(), rule="sltt", fused="yes")


# ------------------------------------------------------------------------------------------------------
# CUDA: the same checks on the GPU (skipped without one; CI has none)
# ------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_cuda_forward_equals_spikingjelly_and_backward_equals_reference(cfg, dtype):
    kind, v_reset, decay, detach = cfg
    sg = SURROGATES["sigmoid"]()
    x = make_input(torch.float32).to("cuda", dtype)
    v0 = (make_input(torch.float32, seed=1)[0] * 0.5).to("cuda", dtype)
    w = plif_w(torch.float32).cuda() if kind == "plif" else None
    # forward: the fused function against SpikingJelly's own multi-step neuron on the same device
    node = sj_node(kind, v_reset, decay, detach, sg, store_v_seq=True).to("cuda")
    node.v = v0.clone()
    with torch.no_grad():
        expected = node(x)
        spikes, v, v_seq = fused(kind, x, v0, decay, v_reset, detach, sg, w=w, store_v_seq=True)
    assert torch.equal(spikes, expected)
    torch.testing.assert_close(v_seq, node.v_seq, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)
    # backward: against the per-step detached reference, on the GPU (fp32 only: fp16's reference itself
    # rounds differently step by step)
    if dtype == torch.float32:
        ref_spikes, ref_gx, ref_gw = _grads(
            kind, x, w, lambda x, w: reference_sltt(kind, x, v0, decay, v_reset, detach, sg, w=w), True)
        got_spikes, gx, gw = _grads(
            kind, x, w, lambda x, w: fused(kind, x, v0, decay, v_reset, detach, sg, w=w, store_v_seq=True), True)
        assert torch.equal(got_spikes, ref_spikes)
        _assert_rel_close(gx, ref_gx, "input gradient (cuda)")
        if kind == "plif":
            _assert_rel_close(gw.reshape(1), ref_gw.reshape(1), "w gradient (cuda)")


def test_neuron_speed_benchmark_runs_and_the_fused_neuron_keeps_no_more(tmp_path):
    # benchmarks/neuron_speed.py at smoke size: every (neuron, reset) row is filled, and the fused neuron
    # keeps no more for backward than SpikingJelly's own (one [T, N] tensor against its three with a hard
    # reset); the times on this shared CPU are only checked to be there
    import importlib.util
    import json
    import pathlib

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "neuron_speed.py"
    spec = importlib.util.spec_from_file_location("neuron_speed_under_test", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "neuron_speed.json"
    assert bench.main(["--Ts", "3", "--shape", "2", "4", "5", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["neuron"], r["setting"]) for r in rows} == {(k, s) for k in bench.KINDS for s in bench.SETTINGS}
    one = 3 * 2 * 4 * 5 * 4 / 2 ** 20  # one [T, N] float32 tensor, in MB
    if callable(getattr(sj_neuron.LIFNode, "materialize_states", None)):  # SpikingJelly 2: all are fused
        assert {r["fused_path"] for r in rows} == {"fused"}
    for r in (r for r in rows if r["fused_path"] == "fused"):
        assert r["sj_ms"] > 0 and r["fused_ms"] > 0
        assert r["fused_saved_mb"] <= r["sj_saved_mb"] + 1e-12, r
        if r["setting"] == "hard" and r["neuron"] != "ParametricLIFNode":
            assert r["fused_saved_mb"] == pytest.approx(one) and r["sj_saved_mb"] >= 2 * one, r
