"""Independent reference check of the SLTT rule of ``snn_localrules``.

SLTT (Spatial Learning Through Time, Meng et al. 2023) is backprop through a
spiking network in which, at every time step, each neuron's carried state
from the previous step (membrane potential, synaptic current, ...) is a
constant in backward.  With the per-step loss

    L = (1/T) * sum_t CE(o[t], y)

the SLTT gradient is: for every t, run step t with all neuron states detached
at the start of the step, backpropagate L_t = CE(o[t], y) / T, and add up the
parameter gradients.

This module computes that gradient with plain torch: hand-written neuron
equations and a hand-written Heaviside spike with a surrogate derivative
(``_RefSpike``).  No SpikingJelly / snnTorch neuron module takes part in the
reference computation; the framework models are only read for their weights.

The test groups:

* ``test_reference_matches_framework_bptt``: the reference *without* the
  detach equals plain full BPTT autograd through the framework model (no
  wrapping), forward spikes included.  This proves the hand-written equations
  match the installed framework versions.  The hidden layer's spike rate is
  checked to be in (0.05, 0.95) so the comparison is not vacuous.
* ``test_sltt_differs_from_bptt``: the SLTT gradient is measurably different
  from BPTT, so comparing against it is not vacuous either.
* ``test_api_*``: the project's API (``slr.wrap(model, rule="sltt")``), in
  zero-change mode (the user's own BPTT loop) and in online mode
  (``learner.step``), against the reference SLTT gradient, on every
  parameter's ``.grad`` (rtol 1e-5).

Precision: SpikingJelly cases run in float64 (its pure-torch reference path)
and, for a subset, in float32 (its registered custom-op path, the one users
normally hit on CPU).  snnTorch cases run in float32 only: snnTorch's ATan
spike forward returns ``(x > 0).float()`` whatever the input dtype, so a
float64 snnTorch network feeds float32 spikes into a float64 Linear and
fails.  float64 cases are compared with rtol=1e-5, atol=1e-7; float32 cases
with rtol=1e-5, atol=2e-7 (float32 gradient entries of a few 1e-2 that are
sums of cancelling terms carry absolute rounding errors up to ~6e-8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

T_STEPS = 6
BATCH = 4
N_IN = 12
N_HID = 16
N_OUT = 5


# hundreds of tiny cases: one intra-op thread (conftest.one_intra_op_thread)
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------
# Reference spike function
# --------------------------------------------------------------------------


def _surrogate_derivative(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """d spike / d u of the surrogate, written from the papers' formulas.

    sigmoid: spike ~ sigmoid(alpha u), derivative alpha * s * (1 - s)
    atan:    spike ~ atan(pi/2 alpha u) / pi + 1/2,
             derivative (alpha/2) / (1 + (pi/2 alpha u)^2)
    """
    if kind == "sigmoid":
        s = torch.sigmoid(alpha * u)
        return alpha * s * (1.0 - s)
    if kind == "atan":
        z = (math.pi / 2.0) * alpha * u
        return (alpha / 2.0) / (1.0 + z * z)
    raise ValueError(kind)


class _RefSpike(torch.autograd.Function):
    """Heaviside forward, surrogate derivative backward.

    ``strict`` selects the convention at u == 0: SpikingJelly fires when
    v >= threshold, snnTorch when mem > threshold.
    """

    @staticmethod
    def forward(ctx, u, kind, alpha, strict):
        ctx.save_for_backward(u)
        ctx.kind = kind
        ctx.alpha = alpha
        fired = u > 0 if strict else u >= 0
        return fired.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        return grad_out * _surrogate_derivative(u, ctx.kind, ctx.alpha), None, None, None


def ref_spike(u, kind, alpha, strict):
    return _RefSpike.apply(u, kind, alpha, strict)


# --------------------------------------------------------------------------
# Case description
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    framework: str  # "sj" | "snntorch"
    neuron: str  # sj: "if" | "lif" | "plif"; snntorch: "leaky" | "synaptic"
    style: str  # sj: "s" | "m" (step mode); snntorch: "hidden" | "explicit" | "explicitkw"
    dtype: torch.dtype
    # SpikingJelly options
    tau: float = 2.0
    decay_input: bool = True
    v_reset: Optional[float] = 0.0
    detach_reset: bool = False
    surrogate: str = "sigmoid"
    # snnTorch options
    beta: float = 0.8
    syn_alpha: float = 0.7
    reset_mechanism: str = "subtract"
    # data scaling so that the layers actually spike
    in_scale: float = 6.0
    in_shift: float = 0.5
    out_gain: float = 12.0

    @property
    def alpha(self) -> float:
        # defaults of the installed frameworks:
        # spikingjelly surrogate.Sigmoid(alpha=4.0), surrogate.ATan(alpha=2.0),
        # snntorch surrogate.atan(alpha=2.0)
        if self.framework == "snntorch":
            return 2.0
        return {"sigmoid": 4.0, "atan": 2.0}[self.surrogate]

    @property
    def threshold(self) -> float:
        return 1.0

    @property
    def rtol(self) -> float:
        return 1e-5

    @property
    def atol(self) -> float:
        return 1e-7 if self.dtype == torch.float64 else 2e-7


def _sj_cases() -> List[Case]:
    cases = []
    for mode in ("s", "m"):
        cases.append(Case(f"sj-{mode}-if-hard-f64", "sj", "if", mode, torch.float64))
        cases.append(Case(f"sj-{mode}-if-soft-atan-f64", "sj", "if", mode, torch.float64,
                          v_reset=None, surrogate="atan"))
        for decay_input in (True, False):
            for v_reset in (0.0, None):
                for detach_reset in (False, True):
                    name = "sj-{}-lif-{}-{}-{}-f64".format(
                        mode,
                        "decayin" if decay_input else "nodecayin",
                        "hard" if v_reset is not None else "soft",
                        "detachreset" if detach_reset else "graphreset",
                    )
                    cases.append(Case(name, "sj", "lif", mode, torch.float64,
                                      decay_input=decay_input, v_reset=v_reset,
                                      detach_reset=detach_reset))
        cases.append(Case(f"sj-{mode}-lif-atan-f64", "sj", "lif", mode, torch.float64,
                          surrogate="atan"))
        cases.append(Case(f"sj-{mode}-plif-decayin-hard-f64", "sj", "plif", mode,
                          torch.float64))
        cases.append(Case(f"sj-{mode}-plif-nodecayin-soft-detachreset-f64", "sj", "plif",
                          mode, torch.float64, decay_input=False, v_reset=None,
                          detach_reset=True))
        # float32: SpikingJelly's registered custom-op path (torch.ops.sj_*)
        cases.append(Case(f"sj-{mode}-if-hard-f32", "sj", "if", mode, torch.float32))
        cases.append(Case(f"sj-{mode}-lif-decayin-hard-f32", "sj", "lif", mode,
                          torch.float32))
        cases.append(Case(f"sj-{mode}-lif-nodecayin-soft-f32", "sj", "lif", mode,
                          torch.float32, decay_input=False, v_reset=None))
        cases.append(Case(f"sj-{mode}-plif-decayin-hard-f32", "sj", "plif", mode,
                          torch.float32))
    return cases


def _snntorch_cases() -> List[Case]:
    cases = []
    for style in ("hidden", "explicit"):
        cases.append(Case(f"snn-{style}-leaky-subtract-f32", "snntorch", "leaky", style,
                          torch.float32))
        cases.append(Case(f"snn-{style}-leaky-zero-f32", "snntorch", "leaky", style,
                          torch.float32, reset_mechanism="zero"))
        cases.append(Case(f"snn-{style}-synaptic-subtract-f32", "snntorch", "synaptic",
                          style, torch.float32))
        cases.append(Case(f"snn-{style}-synaptic-zero-f32", "snntorch", "synaptic",
                          style, torch.float32, reset_mechanism="zero"))
    # init_hidden=False with the state passed by keyword: lif(cur, mem=mem)
    cases.append(Case("snn-explicitkw-leaky-subtract-f32", "snntorch", "leaky", "explicitkw",
                      torch.float32))
    cases.append(Case("snn-explicitkw-synaptic-subtract-f32", "snntorch", "synaptic",
                      "explicitkw", torch.float32))
    return cases


SJ_CASES = _sj_cases()
SNN_CASES = _snntorch_cases()
ALL_CASES = SJ_CASES + SNN_CASES
ONLINE_CASES = [c for c in ALL_CASES if c.style not in ("explicit", "explicitkw")]
EXPLICIT_CASES = [c for c in SNN_CASES if c.style in ("explicit", "explicitkw")]
LIF_TAU2_CASES = [c for c in SJ_CASES
                  if c.neuron == "lif" and c.tau == 2.0 and c.dtype == torch.float64]


def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# --------------------------------------------------------------------------
# Framework models (only used for their weights and for the API under test)
# --------------------------------------------------------------------------


class _ExplicitStateNet(nn.Module):
    """snnTorch tutorial style (init_hidden=False): the caller owns the state."""

    def __init__(self, case: Case):
        super().__init__()
        import snntorch as snn

        self.fc1 = nn.Linear(N_IN, N_HID)
        self.fc2 = nn.Linear(N_HID, N_OUT)
        self.synaptic = case.neuron == "synaptic"
        self.by_keyword = case.style == "explicitkw"
        if self.synaptic:
            self.lif1 = snn.Synaptic(alpha=case.syn_alpha, beta=case.beta,
                                     reset_mechanism=case.reset_mechanism)
            self.lif2 = snn.Synaptic(alpha=case.syn_alpha, beta=case.beta,
                                     reset_mechanism=case.reset_mechanism)
        else:
            self.lif1 = snn.Leaky(beta=case.beta, reset_mechanism=case.reset_mechanism)
            self.lif2 = snn.Leaky(beta=case.beta, reset_mechanism=case.reset_mechanism)

    def init_states(self):
        if self.synaptic:
            syn1, mem1 = self.lif1.init_synaptic()
            syn2, mem2 = self.lif2.init_synaptic()
            return (syn1, mem1, syn2, mem2)
        return (self.lif1.init_leaky(), self.lif2.init_leaky())

    def forward(self, x_t, states):
        if self.synaptic:
            syn1, mem1, syn2, mem2 = states
            cur1 = self.fc1(x_t)
            if self.by_keyword:
                spk1, syn1, mem1 = self.lif1(cur1, syn=syn1, mem=mem1)
            else:
                spk1, syn1, mem1 = self.lif1(cur1, syn1, mem1)
            cur2 = self.fc2(spk1)
            if self.by_keyword:
                spk2, syn2, mem2 = self.lif2(cur2, syn=syn2, mem=mem2)
            else:
                spk2, syn2, mem2 = self.lif2(cur2, syn2, mem2)
            return spk2, (syn1, mem1, syn2, mem2)
        mem1, mem2 = states
        cur1 = self.fc1(x_t)
        spk1, mem1 = self.lif1(cur1, mem=mem1) if self.by_keyword else self.lif1(cur1, mem1)
        cur2 = self.fc2(spk1)
        spk2, mem2 = self.lif2(cur2, mem=mem2) if self.by_keyword else self.lif2(cur2, mem2)
        return spk2, (mem1, mem2)


def _sj_neuron(case: Case):
    from spikingjelly.activation_based import neuron, surrogate

    sg = {"sigmoid": surrogate.Sigmoid, "atan": surrogate.ATan}[case.surrogate]()
    kw = dict(v_reset=case.v_reset, surrogate_function=sg, detach_reset=case.detach_reset)
    if case.neuron == "if":
        return neuron.IFNode(**kw)
    if case.neuron == "lif":
        return neuron.LIFNode(tau=case.tau, decay_input=case.decay_input, **kw)
    if case.neuron == "plif":
        return neuron.ParametricLIFNode(init_tau=case.tau, decay_input=case.decay_input, **kw)
    raise ValueError(case.neuron)


def build_model(case: Case) -> Tuple[nn.Module, Dict[str, str]]:
    """Framework model + map from reference parameter key to model parameter name."""
    torch.manual_seed(1234)
    if case.framework == "sj":
        from spikingjelly.activation_based import functional, layer

        model = nn.Sequential(
            layer.Linear(N_IN, N_HID), _sj_neuron(case),
            layer.Linear(N_HID, N_OUT), _sj_neuron(case),
        )
        if case.style == "m":
            functional.set_step_mode(model, "m")
        names = {"W1": "0.weight", "b1": "0.bias", "W2": "2.weight", "b2": "2.bias"}
        if case.neuron == "plif":
            # give the two layers different time constants
            with torch.no_grad():
                model[3].w.fill_(-math.log(3.0 - 1.0))
            names.update({"w1": "1.w", "w2": "3.w"})
        fc2 = model[2]
    else:
        import snntorch as snn

        if case.style == "hidden":
            if case.neuron == "synaptic":
                def mk(**kw):
                    return snn.Synaptic(alpha=case.syn_alpha, beta=case.beta,
                                        reset_mechanism=case.reset_mechanism,
                                        init_hidden=True, **kw)
            else:
                def mk(**kw):
                    return snn.Leaky(beta=case.beta, reset_mechanism=case.reset_mechanism,
                                     init_hidden=True, **kw)
            model = nn.Sequential(nn.Linear(N_IN, N_HID), mk(),
                                  nn.Linear(N_HID, N_OUT), mk(output=True))
            names = {"W1": "0.weight", "b1": "0.bias", "W2": "2.weight", "b2": "2.bias"}
            fc2 = model[2]
        else:
            model = _ExplicitStateNet(case)
            names = {"W1": "fc1.weight", "b1": "fc1.bias",
                     "W2": "fc2.weight", "b2": "fc2.bias"}
            fc2 = model.fc2
    with torch.no_grad():
        fc2.weight.mul_(case.out_gain)
    model = model.to(case.dtype)
    # every trainable parameter must be covered by the comparison
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names.values()), (trainable, names)
    return model, names


def make_data(case: Case):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(T_STEPS, BATCH, N_IN, generator=g, dtype=torch.float64)
    x = (x * case.in_scale + case.in_shift).to(case.dtype)
    y = torch.randint(0, N_OUT, (BATCH,), generator=g)
    return x, y


def _neuron_modules(model: nn.Module):
    import snntorch as snn

    return [m for m in model.modules() if isinstance(m, (snn.Leaky, snn.Synaptic))]


def reset_model(case: Case, model: nn.Module) -> None:
    """What the user does before a sequence in zero-change mode."""
    if case.framework == "sj":
        from spikingjelly.activation_based import functional

        functional.reset_net(model)
    elif case.style == "hidden":
        for m in _neuron_modules(model):
            m.reset_mem()
    # explicit style: the user loop re-initialises its own states


def user_forward(case: Case, model: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The user's own time loop; returns the output spikes o, shape [T, B, N_OUT]."""
    if case.framework == "sj":
        if case.style == "m":
            return model(x_seq)
        return torch.stack([model(x_seq[t]) for t in range(x_seq.shape[0])])
    if case.style == "hidden":
        return torch.stack([model(x_seq[t])[0] for t in range(x_seq.shape[0])])
    states = model.init_states()
    outs = []
    for t in range(x_seq.shape[0]):
        spk, states = model(x_seq[t], states)
        outs.append(spk)
    return torch.stack(outs)


def user_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(out[t], y) for t in range(out.shape[0])) / out.shape[0]


def run_user_bptt(case: Case, model: nn.Module, x_seq, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    reset_model(case, model)
    out = user_forward(case, model, x_seq)
    user_loss(out, y).backward()
    reset_model(case, model)
    return out.detach()


# --------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------


def ref_params_from(model: nn.Module, names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {k: named[n].detach().clone().requires_grad_(True) for k, n in names.items()}


def _ref_init_state(case: Case, like: torch.Tensor):
    zero = torch.zeros_like(like)
    if case.framework == "sj":
        v0 = 0.0 if case.v_reset is None else case.v_reset
        return (torch.full_like(like, v0),)
    if case.neuron == "synaptic":
        return (zero, zero.clone())  # (syn, mem)
    return (zero,)  # (mem,)


def _ref_neuron_step(case: Case, x, state, w=None):
    """One step of one neuron layer: returns (spikes, new_state)."""
    thr = case.threshold
    if case.framework == "sj":
        (v,) = state
        vr = 0.0 if case.v_reset is None else case.v_reset
        # charge
        if case.neuron == "if":
            h = v + x
        else:
            k = (1.0 / case.tau) if case.neuron == "lif" else torch.sigmoid(w)  # PLIF: 1/tau = sigmoid(w)
            if case.decay_input:
                h = v + (x - (v - vr)) * k
            else:
                h = v - (v - vr) * k + x
        # fire
        s = ref_spike(h - thr, case.surrogate, case.alpha, strict=False)
        # reset (after firing, same step)
        s_r = s.detach() if case.detach_reset else s
        if case.v_reset is None:
            v_new = h - s_r * thr
        else:
            v_new = s_r * vr + (1.0 - s_r) * h
        return s, (v_new,)

    # snnTorch: the reset of this step comes from the *previous* membrane
    # (reset_delay=True), is a hard Heaviside (no gradient), and beta/alpha
    # are clamped to [0, 1].
    beta = min(max(case.beta, 0.0), 1.0)
    if case.neuron == "leaky":
        (mem,) = state
        r = (mem.detach() > thr).to(mem.dtype)
        if case.reset_mechanism == "subtract":
            mem_new = beta * mem + x - r * thr
        else:  # zero: previous membrane is zeroed, the new input is kept
            mem_new = beta * (1.0 - r) * mem + x
        s = ref_spike(mem_new - thr, "atan", case.alpha, strict=True)
        return s, (mem_new,)
    syn, mem = state
    a = min(max(case.syn_alpha, 0.0), 1.0)
    r = (mem.detach() > thr).to(mem.dtype)
    syn_new = a * syn + x
    if case.reset_mechanism == "subtract":
        mem_new = beta * mem + syn_new - r * thr
    else:  # zero: the whole new membrane (input included) is zeroed, syn is kept
        mem_new = (1.0 - r) * (beta * mem + syn_new)
    s = ref_spike(mem_new - thr, "atan", case.alpha, strict=True)
    return s, (syn_new, mem_new)


@dataclasses.dataclass
class RefResult:
    grads: Dict[str, torch.Tensor]
    out: torch.Tensor  # output spikes [T, B, N_OUT]
    hidden_rate: float
    out_rate: float


def reference(case: Case, params: Dict[str, torch.Tensor], x_seq, y, sltt: bool) -> RefResult:
    """Reference gradient of L = (1/T) sum_t CE(o[t], y).

    sltt=True: every neuron state is detached at the start of every step and
    the per-step losses are backpropagated one by one; the gradients are
    summed.  sltt=False: plain BPTT through the whole sequence.
    """
    keys = list(params)
    plist = [params[k] for k in keys]
    grads = [torch.zeros_like(p) for p in plist]
    T = x_seq.shape[0]
    st1 = st2 = None
    outs, hid = [], []
    total = 0.0
    for t in range(T):
        cur1 = F.linear(x_seq[t], params["W1"], params["b1"])
        if st1 is None:
            st1 = _ref_init_state(case, cur1.detach())
        if sltt:
            st1 = tuple(s.detach() for s in st1)
        s1, st1 = _ref_neuron_step(case, cur1, st1, params.get("w1"))
        cur2 = F.linear(s1, params["W2"], params["b2"])
        if st2 is None:
            st2 = _ref_init_state(case, cur2.detach())
        if sltt:
            st2 = tuple(s.detach() for s in st2)
        s2, st2 = _ref_neuron_step(case, cur2, st2, params.get("w2"))
        loss_t = F.cross_entropy(s2, y) / T
        if sltt:
            g = torch.autograd.grad(loss_t, plist, allow_unused=True)
            grads = [a + (b if b is not None else 0.0) for a, b in zip(grads, g)]
        else:
            total = total + loss_t
        outs.append(s2.detach())
        hid.append(s1.detach())
    if not sltt:
        g = torch.autograd.grad(total, plist, allow_unused=True)
        grads = [b if b is not None else torch.zeros_like(p) for p, b in zip(plist, g)]
    out = torch.stack(outs)
    return RefResult(dict(zip(keys, grads)), out,
                     torch.stack(hid).mean().item(), out.mean().item())


def assert_grads_match(case: Case, model: nn.Module, names: Dict[str, str],
                       ref: Dict[str, torch.Tensor], what: str) -> None:
    named = dict(model.named_parameters())
    for key, name in names.items():
        g = named[name].grad
        assert g is not None, f"{what}: parameter {name!r} has no .grad"
        torch.testing.assert_close(
            g, ref[key], rtol=case.rtol, atol=case.atol,
            msg=lambda m, name=name: f"{what}: .grad of {name!r} differs from the "
                                     f"reference SLTT/BPTT gradient\n{m}")


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------
# (a) the reference equations are the frameworks' equations
# --------------------------------------------------------------------------


def skip_snntorch_09_explicit_synaptic(case: Case) -> None:
    if case.framework == "snntorch" and case.neuron == "synaptic" and case.style != "hidden":
        import snntorch

        if int(snntorch.__version__.split(".")[0]) < 1:
            # snnTorch 0.9's Synaptic, given its state explicitly, stores mem in place of syn (fixed in
            # 1.0): it does not compute the Synaptic equations, so there is nothing to compare against
            pytest.skip("snnTorch < 1.0: Synaptic with explicit state overwrites syn with mem (upstream bug)")


@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_reference_matches_framework_bptt(case: Case):
    skip_snntorch_09_explicit_synaptic(case)
    model, names = build_model(case)
    x, y = make_data(case)
    ref = reference(case, ref_params_from(model, names), x, y, sltt=False)
    assert 0.05 < ref.hidden_rate < 0.95, f"hidden spike rate {ref.hidden_rate:.3f}: vacuous case"
    assert 0.02 < ref.out_rate < 0.98, f"output spike rate {ref.out_rate:.3f}: vacuous case"
    out = run_user_bptt(case, model, x, y)
    torch.testing.assert_close(out, ref.out, rtol=0, atol=0,
                               msg=lambda m: f"forward spikes differ from the reference\n{m}")
    assert_grads_match(case, model, names, ref.grads, "framework BPTT")


def test_float64_snntorch_is_not_usable():
    """Documents why snnTorch cases run in float32 (see module docstring)."""
    import snntorch as snn

    lif = snn.Leaky(beta=0.8).to(torch.float64)
    spk, _ = lif(torch.full((2, 3), 2.0, dtype=torch.float64))
    assert spk.dtype == torch.float32


# --------------------------------------------------------------------------
# (b) SLTT is not BPTT
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_sltt_differs_from_bptt(case: Case):
    model, names = build_model(case)
    x, y = make_data(case)
    p = ref_params_from(model, names)
    sltt = reference(case, p, x, y, sltt=True)
    bptt = reference(case, p, x, y, sltt=False)
    # same forward
    torch.testing.assert_close(sltt.out, bptt.out, rtol=0, atol=0)
    # the first layer's weight gradient is where temporal paths matter most
    d = _rel_diff(sltt.grads["W1"], bptt.grads["W1"])
    assert d > 1e-2, f"SLTT and BPTT W1 gradients differ by only {d:.2e} (relative)"
    for k, g in sltt.grads.items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"SLTT gradient of {k} is zero"


@pytest.mark.parametrize("case", _params(LIF_TAU2_CASES))
def test_framework_bptt_is_not_the_sltt_reference(case: Case):
    """The framework's own BPTT gradient fails the SLTT comparison (LIF, tau=2)."""
    model, names = build_model(case)
    x, y = make_data(case)
    sltt = reference(case, ref_params_from(model, names), x, y, sltt=True)
    run_user_bptt(case, model, x, y)
    with pytest.raises(AssertionError):
        assert_grads_match(case, model, names, sltt.grads, "framework BPTT vs SLTT")


# --------------------------------------------------------------------------
# The API under test
# --------------------------------------------------------------------------


def _slr():
    return pytest.importorskip("snn_localrules")


@pytest.mark.parametrize("case", _params(ALL_CASES))
def test_api_zero_change_mode(case: Case):
    skip_snntorch_09_explicit_synaptic(case)
    slr = _slr()
    model, names = build_model(case)
    x, y = make_data(case)
    p = ref_params_from(model, names)
    ref_sltt = reference(case, p, x, y, sltt=True)
    ref_bptt = reference(case, p, x, y, sltt=False)

    learner = slr.wrap(model, rule="sltt")
    try:
        out = run_user_bptt(case, model, x, y)
        torch.testing.assert_close(out, ref_sltt.out, rtol=0, atol=0,
                                   msg=lambda m: f"wrapped forward spikes changed\n{m}")
        assert_grads_match(case, model, names, ref_sltt.grads, "zero-change SLTT")
        # a second sequence (user resets in between) gives the same gradient
        run_user_bptt(case, model, x, y)
        assert_grads_match(case, model, names, ref_sltt.grads, "zero-change SLTT, 2nd sequence")
    finally:
        learner.unwrap()

    # after unwrap() the model is plain BPTT again
    run_user_bptt(case, model, x, y)
    assert_grads_match(case, model, names, ref_bptt.grads, "BPTT after unwrap()")


@pytest.mark.parametrize("case", _params(ONLINE_CASES))
def test_api_online_mode(case: Case):
    slr = _slr()
    model, names = build_model(case)
    x, y = make_data(case)
    p = ref_params_from(model, names)
    ref = reference(case, p, x, y, sltt=True)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce")
    try:
        # stale gradients must be cleared by step()
        for q in model.parameters():
            q.grad = torch.full_like(q, 7.0)
        learner.step(x, y)
        assert_grads_match(case, model, names, ref.grads, "online step() #1")
        # states are reset at the start/end of step(): a second call is identical
        learner.step(x, y)
        assert_grads_match(case, model, names, ref.grads, "online step() #2")
    finally:
        learner.unwrap()
    named = dict(model.named_parameters())
    for key, name in names.items():  # lr = 0: parameters unchanged
        torch.testing.assert_close(named[name].detach(), p[key].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [2, T_STEPS])
@pytest.mark.parametrize("case", _params(ONLINE_CASES))
def test_api_online_mode_chunked(case: Case, chunk: int):
    # c steps per forward call and one backward of their summed losses: the state is still cut at every
    # step, so the gradient is the per-step reference's for any c
    slr = _slr()
    model, names = build_model(case)
    x, y = make_data(case)
    ref = reference(case, ref_params_from(model, names), x, y, sltt=True)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), chunk=chunk)
    try:
        learner.step(x, y)
        assert_grads_match(case, model, names, ref.grads, f"online step(), chunk={chunk}")
    finally:
        learner.unwrap()


@pytest.mark.parametrize("case", _params([c for c in ONLINE_CASES if c.id in (
    "sj-s-lif-decayin-hard-graphreset-f64", "sj-m-plif-decayin-hard-f64", "snn-hidden-synaptic-subtract-f32")]))
def test_api_online_mode_applies_one_sgd_update(case: Case):
    slr = _slr()
    model, names = build_model(case)
    x, y = make_data(case)
    p = ref_params_from(model, names)
    ref = reference(case, p, x, y, sltt=True)
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce")
    try:
        learner.step(x, y)
    finally:
        learner.unwrap()
    named = dict(model.named_parameters())
    for key, name in names.items():
        expected = p[key].detach() - lr * ref.grads[key]
        torch.testing.assert_close(
            named[name].detach(), expected, rtol=case.rtol, atol=case.atol,
            msg=lambda m, name=name: f"parameter {name!r} after one step()\n{m}")


@pytest.mark.parametrize("case", _params(EXPLICIT_CASES))
def test_api_online_mode_rejects_snntorch_explicit_state(case: Case):
    slr = _slr()
    model, _ = build_model(case)
    x, y = make_data(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(Exception) as info:
        learner = slr.wrap(model, rule="sltt", optimizer=opt, loss="ce")
        try:
            learner.step(x, y)
        finally:
            learner.unwrap()
    assert not isinstance(info.value, (AssertionError, pytest.fail.Exception))
