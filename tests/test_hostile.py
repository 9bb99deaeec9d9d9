"""Hostile input for both rules (online SLTT, zero-change SLTT, TP): every bad call raises an error that
names the problem and the fix, or behaves as documented (README, "Errors and edge cases"), and a failed
call leaves the model (state_dict, hooks, step modes), the optimizer (state_dict) and the learner usable
exactly as before."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from conftest import assert_same_snapshot, snapshot
from models import sj_lif_passes_gradient_in_eval_mode

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

RULES = ["sltt", "tp"]
T, B, C = 4, 3, 5


class Boom(nn.Module):
    """Identity that raises on the chosen call (counted from 1): a bug in the user's model."""

    def __init__(self, on_call=0, exc=RuntimeError):
        super().__init__()
        self.on_call, self.exc, self.calls = on_call, exc, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.on_call:
            raise self.exc("boom in the user's model")
        return x


def make_model(boom=None, step_mode="s"):
    """Linear-BN-LIF-Linear-LIF-Linear readout; BN (running statistics) first, so a failure later in a
    step finds them already updated."""
    model = nn.Sequential(
        layer.Linear(12, 16), layer.BatchNorm1d(16), boom or Boom(), neuron.LIFNode(tau=2.0, v_threshold=0.3),
        layer.Linear(16, 16), neuron.LIFNode(tau=2.0, v_threshold=0.3), layer.Linear(16, C),
    )
    functional.set_step_mode(model, step_mode)
    return model


def batch(steps=T, size=B):
    return torch.rand(steps, size, 12) * 3, torch.randint(0, C, (size,))


def make_learner(rule, model=None, warm=True, **options):
    """Model, Adam optimizer and learner; one good batch first so that Adam has state (exp_avg, step)
    and TP has made its label projection and learned the layer order."""
    model = model if model is not None else make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if rule == "tp":
        options.setdefault("num_classes", C)
    learner = slr.wrap(model, rule=rule, optimizer=opt, **options)
    if warm:
        learner.step(*batch())
    return model, opt, learner


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def state(model, opt, learner=None):
    return {
        "model": snapshot(model),
        "opt": _clone(opt.state_dict()),
        "projection": _clone(getattr(learner, "projection", None)),
        "wrapped_by": slr.learner_of(model),
    }


def assert_unchanged(before, model, opt, learner=None):
    assert_same_snapshot(before["model"], snapshot(model))
    assert _same(before["opt"], opt.state_dict()), "optimizer state changed"
    assert _same(before["projection"], getattr(learner, "projection", None)), "TP projection changed"
    assert slr.learner_of(model) is before["wrapped_by"]
    for m in model.modules():  # neurons back at rest
        if isinstance(m, neuron.BaseNode):
            assert isinstance(m.v, float) or not m.v.any()


def assert_still_works(model, learner):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner.step(*batch())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- bad batches: the same for both rules ------------------------------------------------------------
BAD_BATCHES = {
    "x is a list": (lambda x, y: (x.tolist(), y), slr.LayoutError, "x_seq must be a tensor"),
    "x has no batch dim": (lambda x, y: (x[:, 0, 0], y), slr.LayoutError, "time-first"),
    "x is int": (lambda x, y: ((x * 3).long(), y), slr.LayoutError, r"dtype torch.int64.*x_seq.float\(\)"),
    "x is bool": (lambda x, y: (x > 1, y), slr.LayoutError, r"torch.bool.*x_seq.float\(\)"),
    "y is float": (lambda x, y: (x, y.float()), slr.LayoutError, "class indices.*integer dtype"),
    "y is one-hot 2-D": (lambda x, y: (x, F.one_hot(y, C)), slr.LayoutError, r"y.argmax\(-1\)"),
    "y is int32": (lambda x, y: (x, y.int()), slr.LayoutError, r"torch.int32.*y.long\(\)"),
    "y is bool": (lambda x, y: (x, y > 2), slr.LayoutError, r"torch.bool.*y.long\(\)"),
    "y is a list": (lambda x, y: (x, y.tolist()), slr.LayoutError, "y must be a tensor"),
    "y too short": (lambda x, y: (x, y[:-1]), slr.LayoutError, "batch size mismatch"),
    "x batch-first": (lambda x, y: (x.transpose(0, 1), y), slr.LayoutError, r"batch-first.*transpose"),
    "empty batch B=0": (lambda x, y: (x[:, :0], y[:0]), slr.LayoutError, "no time step or no sample"),
    "no time step T=0": (lambda x, y: (x[:0], y), slr.LayoutError, "no time step"),
    "x on another device": (lambda x, y: (x.to("meta"), y), slr.LayoutError, r"x_seq is on meta.*x_seq.to\('cpu'\)"),
    "y on another device": (lambda x, y: (x, y.to("meta")), slr.LayoutError, r"y is on meta.*y.to\(x_seq.device\)"),
    "y above the classes": (lambda x, y: (x, y + C), ValueError, rf"labels must .*\[0, {C}\)"),
    "y negative": (lambda x, y: (x, y - C), ValueError, rf"labels must .*\[0, {C}\)"),
    # errors of the user's own model propagate as they are (after the learner has cleaned up)
    # TP refuses a feature size other than its label projection's (made from the first batch)
    "x has the wrong feature size": (lambda x, y: (torch.rand(T, B, 13), y), (RuntimeError, slr.WrapError),
                                     r"cannot be multiplied|projection was made for inputs \(12,\)"),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch(rule, case):
    make, error, message = BAD_BATCHES[case]
    model, opt, learner = make_learner(rule)
    before = state(model, opt, learner)
    with pytest.raises(error, match=message):
        learner.step(*make(*batch()))
    assert_unchanged(before, model, opt, learner)
    assert_still_works(model, learner)


def test_float16_input_to_a_float32_model():
    """Online SLTT: the model's own dtype error (or pass autocast=... to wrap). TP: the label projection
    (float32, from the first batch) is concatenated with the input, which promotes it: it trains."""
    x, y = batch()
    model, opt, learner = make_learner("sltt")
    before = state(model, opt, learner)
    with pytest.raises(RuntimeError, match="dtype"):
        learner.step(x.half(), y)
    assert_unchanged(before, model, opt, learner)
    for warm in (True, False):  # the projection is made in the model's dtype, whatever the first batch's
        model, opt, learner = make_learner("tp", warm=warm)
        learner.step(x.half(), y)
        assert learner.projection.dtype == torch.float32
        assert all(v.dtype != torch.float16 for v in model.state_dict().values())


@pytest.mark.parametrize("rule", RULES)
def test_first_batch_failing_does_not_poison_the_learner(rule):
    """A failed first batch (TP makes its label projection from it) leaves a learner that accepts the
    right input afterwards."""
    model, opt, learner = make_learner(rule, warm=False)
    before = state(model, opt, learner)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        learner.step(torch.rand(T, B, 13), batch()[1])
    assert_unchanged(before, model, opt, learner)
    assert getattr(learner, "projection", None) is None
    assert_still_works(model, learner)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_at_a_late_step(rule, value):
    """NaN/inf at the last step: the spike function hides it in forward; nothing may be updated."""
    model, opt, learner = make_learner(rule)
    x, y = batch()
    x[-1, 0, 0] = value
    before = state(model, opt, learner)
    error = slr.NonFiniteLossError if rule == "sltt" else slr.LayoutError
    with pytest.raises(error, match="NaN|inf|non-finite"):
        learner.step(x, y)
    assert_unchanged(before, model, opt, learner)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert_still_works(model, learner)


def test_sltt_non_finite_loss():
    calls = []

    def loss(o, y):  # NaN at the third step of the second batch (the first is the warm-up)
        calls.append(1)
        return F.cross_entropy(o, y) * (float("nan") if len(calls) == T + 3 else 1.0)

    model, opt, learner = make_learner("sltt", loss=loss)
    before = state(model, opt, learner)
    with pytest.raises(slr.NonFiniteLossError, match="time step 2 is not finite"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


def test_tp_non_finite_loss():
    """A model producing NaN (here: its readout, at the first step) makes the TP loss NaN: refused
    before the optimizer steps."""
    class NaNOut(nn.Module):
        def forward(self, x):
            return x * float("nan")

    model = make_model()
    model.append(NaNOut())
    model, opt, learner = make_learner("tp", model=model, warm=False)
    before = state(model, opt, learner)
    with pytest.raises(slr.NonFiniteLossError, match="time step 0"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


class _NaNGradientAt(nn.Module):
    """Identity in forward; from its ``on_call``-th call on, a NaN gradient in backward: the loss stays
    finite and only the gradients of the layers before it are not."""

    def __init__(self, on_call):
        super().__init__()
        self.on_call, self.calls = on_call, 0

    def forward(self, x):
        self.calls += 1
        return _NaNBackward.apply(x) if self.on_call is not None and self.calls >= self.on_call else x


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_gradients_under_a_finite_loss(rule):
    """TP checked only its loss: a NaN gradient (as a NaN label-path input makes, which the spike function
    hides in forward) reached the optimizer with the loss reading finite. Both rules refuse it (from the
    first step of the second batch: TP keeps the updates of the steps before a failing one)."""
    nan = _NaNGradientAt(on_call=None)
    model, opt, learner = make_learner(rule, model=make_model(boom=nan))
    nan.calls, nan.on_call = 0, 1
    before = state(model, opt, learner)
    with pytest.raises(slr.NonFiniteLossError, match=r"non-finite gradients in 0\.weight, 0\.bias"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


@pytest.mark.parametrize("rule, options, message", [
    ("sltt", dict(loss="mse"), r"^loss sets how online mode's steps run.*zero-change mode"),
    ("sltt", dict(autocast=True, seed=3), r"^seed, autocast set how online mode's steps run"),
    ("sltt", dict(sample="last"), "sample sets"),
    ("sltt", dict(nograd_chunk=2), "nograd_chunk sets"),
    ("sltt", dict(seed="abc", optimizer=True), r"seed must be an int or None, got 'abc'"),
    ("sltt", dict(T=True), r"T must be a positive int or None, got True"),
    ("sltt", dict(multi_step="no"), r"multi_step must be None.*True or False, got 'no'"),
    ("tp", dict(label_scale=float("nan")), r"label_scale must be a positive number"),
    ("tp", dict(label_scale=0.0), r"label_scale must be a positive number"),
    ("tp", dict(label_scale="big"), r"label_scale must be a positive number.*'big'"),
    ("tp", dict(seed="abc"), r"seed must be an int, got 'abc'"),
])
def test_options_without_effect_or_of_the_wrong_type_are_refused_at_wrap(rule, options, message):
    model = make_model()
    before = snapshot(model)
    if options.pop("optimizer", rule == "tp"):
        options["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    if rule == "tp":
        options.setdefault("num_classes", C)
    with pytest.raises(slr.WrapError, match=message):
        slr.wrap(model, rule=rule, **options)
    assert_same_snapshot(before, snapshot(model))
    assert slr.learner_of(model) is None


def test_numpy_and_torch_numbers_are_numbers():
    import numpy as np

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for scale in (np.float32(0.5), torch.tensor(0.5)):
        learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=C, label_scale=scale, seed=np.int64(3))
        assert learner.label_scale == 0.5 and learner.seed == 3
        learner.unwrap()
    learner = slr.wrap(model, rule="sltt", optimizer=opt, K=2, seed=np.int64(3))
    assert learner.seed == 3 and type(learner.seed) is int
    learner.unwrap()


# -- the user's model raising mid-step ---------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_the_model_at_the_first_step(rule, exc):
    boom = Boom(exc=exc)
    model, opt, learner = make_learner(rule, model=make_model(boom))
    boom.calls, boom.on_call = 0, 1
    before = state(model, opt, learner)
    with pytest.raises(exc, match="boom"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    boom.on_call = 0
    assert_still_works(model, learner)


def test_sltt_exception_inside_the_model_mid_step():
    """Steps 0-2 ran (BN running statistics updated, gradients accumulated); the exception at step 3
    leaves the model as before the call: parameters, BN statistics, optimizer state; .grad cleared."""
    boom = Boom()
    model, opt, learner = make_learner("sltt", model=make_model(boom))
    boom.calls, boom.on_call = 0, T
    before = state(model, opt, learner)
    with pytest.raises(RuntimeError, match="boom"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    assert all(p.grad is None for p in model.parameters())


def test_tp_exception_inside_the_model_mid_step_is_documented():
    """TP takes an optimizer step at every time step: an exception at step t leaves the updates of
    steps < t applied (as in any per-step training loop); BN statistics, the learner's projection and the
    neurons' state are as before the call."""
    boom = Boom()
    model, opt, learner = make_learner("tp", model=make_model(boom))
    boom.calls, boom.on_call = 0, 3
    before = state(model, opt, learner)
    with pytest.raises(RuntimeError, match="boom"):
        learner.step(*batch())
    now = model.state_dict()
    assert not torch.equal(before["model"]["state"]["0.weight"], now["0.weight"])  # steps 0 and 1 applied
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(before["model"]["state"][name], now[name])
    assert opt.state_dict()["state"][0]["step"] == before["opt"]["state"][0]["step"] + 2
    assert _same(before["projection"], learner.projection)
    assert_same_snapshot({**before["model"], "state": {}}, {**snapshot(model), "state": {}})


# -- the loss (online SLTT) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss, message",
    [
        (lambda o, y: F.cross_entropy(o, y, reduction="none"), r"returned torch.Size\(\[3\]\).*must return a scalar"),
        (lambda o, y: 1.0, "returned float"),
        (lambda o, y: F.cross_entropy(o.detach(), y), "does not require grad"),
    ],
    ids=["non-scalar", "python float", "detached"],
)
def test_bad_loss(loss, message):
    model, opt, learner = make_learner("sltt", loss=loss, warm=False)
    before = state(model, opt, learner)
    with pytest.raises(slr.LossError, match=message):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


def test_loss_that_cannot_be_split_per_step_is_refused_at_wrap():
    snntorch_functional = pytest.importorskip("snntorch.functional")
    model = make_model()
    before = snapshot(model)
    with pytest.raises(slr.LossError, match="ce_rate_loss"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), 0.1),
                 loss=snntorch_functional.ce_count_loss())
    assert_same_snapshot(before, snapshot(model)) and slr.learner_of(model) is None


# -- T=1, eval mode, frozen and shared parameters (documented behaviour) ---------------------------
@pytest.mark.parametrize("rule", RULES)
def test_single_time_step(rule):
    model, opt, learner = make_learner(rule)
    stats = learner.step(*batch(steps=1))
    assert stats.T == 1


def test_sltt_single_step_equals_bptt():
    torch.manual_seed(3)
    model = make_model()
    reference = copy.deepcopy(model)
    x, y = batch(steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    slr.wrap(model, rule="sltt", optimizer=opt).step(x, y)
    F.cross_entropy(reference(x[0]), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_eval_mode_trains_with_running_statistics(rule):
    """step() runs the model in the mode it is in: in eval mode BN uses (and keeps) its running
    statistics and dropout is off; the parameters are trained all the same. Where the neurons pass no
    gradient in eval mode (SpikingJelly before 2.0), step() refuses, changes nothing and says how to keep
    the running statistics: only the BN layers in eval mode."""
    model, opt, learner = make_learner(rule)
    model.eval()
    if not sj_lif_passes_gradient_in_eval_mode():
        before = state(model, opt, learner)
        with pytest.raises(slr.WrapError, match=r"'3' \(spikingjelly\.LIFNode\), '5' .*Heaviside.*model\.train\(\)"
                                                r".*only the BatchNorm layers in eval mode"):
            learner.step(*batch())
        assert_unchanged(before, model, opt, learner)
        model.train()
        model[1].eval()
        bn = {k: v.clone() for k, v in model[1].state_dict().items() if k not in ("weight", "bias")}
        weight = model[0].weight.detach().clone()
        learner.step(*batch())
        assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in bn.items())
        assert not torch.equal(weight, model[0].weight)
        return
    bn = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("1.") and k[2:] in (
        "running_mean", "running_var", "num_batches_tracked")}
    weight = model[0].weight.detach().clone()
    learner.step(*batch())
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn.items())
    assert not torch.equal(weight, model[0].weight)


@pytest.mark.parametrize("rule", RULES)
def test_frozen_parameters_stay_put(rule):
    model = make_model()
    model[0].weight.requires_grad_(False)
    model, opt, learner = make_learner(rule, model=model)
    frozen = model[0].weight.detach().clone()
    trained = model[4].weight.detach().clone()
    learner.step(*batch())
    assert torch.equal(frozen, model[0].weight) and model[0].weight.grad is None
    assert not torch.equal(trained, model[4].weight)


@pytest.mark.parametrize("rule", RULES)
def test_all_parameters_frozen_is_refused_at_wrap(rule):
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    options = {"num_classes": C} if rule == "tp" else {}
    with pytest.raises(slr.WrapError, match=r"requires_grad=False.*requires_grad_\(True\)"):
        slr.wrap(model, rule=rule, optimizer=torch.optim.Adam(model.parameters()), **options)
    assert_same_snapshot(before, snapshot(model)) and slr.learner_of(model) is None


def test_sltt_all_parameters_frozen_after_wrapping():
    model, opt, learner = make_learner("sltt")
    for p in model.parameters():
        p.requires_grad_(False)
    before = state(model, opt, learner)
    with pytest.raises(slr.LossError, match="does not require grad.*requires_grad=False"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


def test_tp_all_parameters_frozen_after_wrapping_changes_nothing():
    """TP has no loss to refuse: with nothing trainable each step's local losses have no gradient, and
    the optimizer leaves every parameter alone."""
    model, opt, learner = make_learner("tp")
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("1.")}
    learner.step(*batch())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("rule", RULES)
def test_shared_parameters(rule):
    """One Linear used at two places (tied weights): its gradient sums both uses, one update per step."""
    shared = layer.Linear(16, 16)
    model = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(v_threshold=0.3), shared,
                          neuron.LIFNode(v_threshold=0.3), shared, neuron.LIFNode(v_threshold=0.3), layer.Linear(16, C))
    model, opt, learner = make_learner(rule, model=model)
    weight = shared.weight.detach().clone()
    learner.step(*batch())
    assert not torch.equal(weight, shared.weight) and torch.isfinite(shared.weight).all()
    assert len(opt.state_dict()["state"]) == len(list(model.parameters())) == 6


def test_sltt_same_neuron_module_used_twice():
    """One neuron instance used at two places is one neuron whose state is cut at every call: the
    online gradient equals a hand-written loop that detaches the membrane before each call."""
    torch.manual_seed(4)
    lif = neuron.LIFNode(tau=2.0)
    model = nn.Sequential(layer.Linear(12, 16), lif, layer.Linear(16, 16), lif, layer.Linear(16, C))
    reference = copy.deepcopy(model)
    x, y = batch()
    slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0)).step(x, y)
    ref_lif = reference[1]
    total = 0
    for t in range(T):
        h = reference[0](x[t])
        for use in (0, 1):
            if isinstance(ref_lif.v, torch.Tensor):
                ref_lif.v = ref_lif.v.detach()
            h = ref_lif(h)
            h = reference[2](h) if use == 0 else reference[4](h)
        total = total + F.cross_entropy(h, y)
    (total / T).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


def test_tp_same_neuron_module_used_twice_is_refused():
    lif = neuron.LIFNode(tau=2.0)
    model = nn.Sequential(layer.Linear(12, 16), lif, layer.Linear(16, 16), lif, layer.Linear(16, C))
    model, opt, learner = make_learner("tp", model=model, warm=False)
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match=r"more than once in one call.*deepcopy"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)


# -- wrapping and unwrapping at the wrong time ------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_wrap_twice(rule):
    model, opt, learner = make_learner(rule)
    before = state(model, opt, learner)
    for other in ("sltt", "tp"):
        with pytest.raises(slr.WrapError, match=rf"already wrapped by rule '{rule}'.*slr.unwrap"):
            slr.wrap(model, rule=other, optimizer=opt, num_classes=C) if other == "tp" else slr.wrap(model, rule=other)
    assert_unchanged(before, model, opt, learner)


@pytest.mark.parametrize("rule", RULES)
def test_unwrap_an_unwrapped_model(rule):
    model, opt, learner = make_learner(rule)
    plain = make_model()
    with pytest.raises(slr.WrapError, match="not wrapped"):
        slr.unwrap(plain)
    learner.unwrap()
    after_first = snapshot(model)
    learner.unwrap()  # documented no-op, safe in a finally:
    with pytest.raises(slr.WrapError, match="not wrapped"):
        slr.unwrap(model)
    assert_same_snapshot(after_first, snapshot(model))
    with pytest.raises(slr.WrapError, match=r"was unwrapped.*wrap the model again"):
        learner.step(*batch())


@pytest.mark.parametrize("rule", RULES)
def test_wrap_from_a_forward_hook_during_step(rule):
    model, opt, learner = make_learner(rule)
    handle = model[4].register_forward_hook(lambda m, i, o: slr.wrap(model, rule="sltt"))
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match="already wrapped"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    handle.remove()
    assert_still_works(model, learner)


@pytest.mark.parametrize("rule", RULES)
def test_unwrap_from_a_forward_hook_during_step(rule):
    model, opt, learner = make_learner(rule)
    handle = model[4].register_forward_hook(lambda m, i, o: learner.unwrap())
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match=r"step\(\) is running.*after step\(\) returns"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    assert learner.wrapped
    handle.remove()
    assert_still_works(model, learner)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("rule", RULES)
def test_step_with_gradients_off(rule, no_grad):
    # SLTT used to fail inside autograd ("element 0 of tensors does not require grad") and TP to run and
    # change nothing
    model, opt, learner = make_learner(rule)
    before = state(model, opt, learner)
    with no_grad(), pytest.raises(slr.WrapError, match=r"gradients are off.*outside that block.*predict"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    assert_still_works(model, learner)


@pytest.mark.parametrize("rule", RULES)
def test_step_from_a_forward_hook_during_step(rule):
    model, opt, learner = make_learner(rule)
    handle = model[4].register_forward_hook(lambda m, i, o: learner.step(*batch()))
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match=r"step\(\) was called while .* running"):
        learner.step(*batch())
    assert_unchanged(before, model, opt, learner)
    handle.remove()


def test_zero_change_wrap_from_inside_the_users_forward():
    """Documented: wrap() takes effect at the next neuron call. Wrapped from a hook at the first step
    (neurons at rest), the whole batch gets SLTT's gradient; unwrap gives the model back as it was,
    the user's own hook included."""
    torch.manual_seed(5)
    model = make_model()
    reference = copy.deepcopy(model)
    learners = []
    handle = model[4].register_forward_hook(
        lambda m, i, o: learners.append(slr.wrap(model, rule="sltt")) if not learners else None)
    before = snapshot(model)
    x, y = batch()
    sum(F.cross_entropy(model(x[t]), y) for t in range(T)).backward()
    functional.reset_net(model)
    assert len(learners) == 1 and slr.learner_of(model) is learners[0]
    total = 0
    for t in range(T):
        for m in (reference[3], reference[5]):
            if isinstance(m.v, torch.Tensor):
                m.v = m.v.detach()
        total = total + F.cross_entropy(reference(x[t]), y)
    total.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    learners[0].unwrap()
    assert_same_snapshot({**before, "state": {}}, {**snapshot(model), "state": {}})  # BN stats: the user's forward
    handle.remove()


def test_zero_change_step_and_options():
    model = make_model()
    learner = slr.wrap(model, rule="sltt")
    with pytest.raises(slr.WrapError, match=r"needs an optimizer.*optimizer=opt"):
        learner.step(*batch())
    with pytest.raises(slr.LayoutError, match="time-first"):
        learner.predict(torch.rand(12))
    learner.unwrap()
    with pytest.raises(slr.WrapError, match="K .*needs online mode"):
        slr.wrap(model, rule="sltt", K=2)
    assert slr.learner_of(model) is None


# -- the optimizer and the options -------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_optimizer_without_the_models_parameters(rule):
    model, other = make_model(), make_model()
    before = snapshot(model)
    options = {"num_classes": C} if rule == "tp" else {}
    with pytest.raises(slr.WrapError, match=r"holds none of the model's parameters.*model.parameters\(\)"):
        slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(other.parameters(), 0.1), **options)
    with pytest.raises(slr.WrapError, match="must be a torch.optim.Optimizer"):
        slr.wrap(model, rule=rule, optimizer=list(model.parameters()), **options)
    assert_same_snapshot(before, snapshot(model)) and slr.learner_of(model) is None


@pytest.mark.parametrize("rule", RULES)
def test_optimizer_with_some_of_the_parameters(rule):
    """Documented: parameters the optimizer does not hold are not trained."""
    model = make_model()
    opt = torch.optim.Adam(model[6].parameters(), lr=1e-2)
    options = {"num_classes": C} if rule == "tp" else {}
    learner = slr.wrap(model, rule=rule, optimizer=opt, **options)
    first, readout = model[0].weight.detach().clone(), model[6].weight.detach().clone()
    learner.step(*batch())
    assert torch.equal(first, model[0].weight) and not torch.equal(readout, model[6].weight)


def test_sltt_K_larger_than_T():
    model, opt, learner = make_learner("sltt", K=T)
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match=rf"K={T} but the batch has only T=2.*K <= T"):
        learner.step(*batch(steps=2))
    assert_unchanged(before, model, opt, learner)


def test_sltt_fixed_T_mismatch():
    model, opt, learner = make_learner("sltt", T=T)
    before = state(model, opt, learner)
    with pytest.raises(slr.LayoutError, match=rf"T=6 time steps.*T={T}"):
        learner.step(*batch(steps=6))
    assert_unchanged(before, model, opt, learner)


def test_sltt_multi_step_model_with_an_output_that_is_not_per_step():
    class SumOverBatch(nn.Module):
        """Returns [T, C]: the batch dimension summed away (a model that returns a rate over time, [B, C],
        is called one step at a time and trains: tests/test_online.py)."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x_seq):
            return self.net(x_seq).sum(1)

    net = make_model(step_mode="m")
    net[1] = layer.SeqToANNContainer(nn.BatchNorm1d(16))  # SpikingJelly 0.0.0.0.14's takes only [T, N, C, L]
    model = SumOverBatch(net)
    model, opt, learner = make_learner("sltt", model=model, warm=False)
    before = state(model, opt, learner)
    with pytest.raises(slr.LayoutError, match=r"returned shape \(1, 5\).*per-step outputs \[T, B, \.\.\.\]"):
        learner.step(*batch(size=7))
    assert_unchanged(before, model, opt, learner)


def test_a_single_step_model_given_a_batch_without_time_is_told_so():
    model = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0, v_threshold=0.3), layer.Linear(16, C))
    model, opt, learner = make_learner("sltt", model=model)
    before = state(model, opt, learner)
    static, y = torch.rand(12, 12), torch.randint(0, C, (12,))  # [B, features], B == features: y fits
    for call in (lambda: learner.step(static, y), lambda: learner.predict(torch.rand(32, 12))):
        with pytest.raises(slr.LayoutError, match=r"one time step x_seq\[t\] has shape \(12,\).*time-first"):
            call()
    assert_unchanged(before, model, opt, learner)


def test_tp_input_shape_changes_between_batches():
    model, opt, learner = make_learner("tp")
    before = state(model, opt, learner)
    with pytest.raises(slr.WrapError, match=r"made for inputs \(12,\), this batch has \(13,\)"):
        learner.step(torch.rand(T, B, 13), batch()[1])
    assert_unchanged(before, model, opt, learner)


@pytest.mark.parametrize(
    "options, message",
    [({"rule": "bptt"}, "unknown rule 'bptt'; installed rules: .*sltt.*tp"),
     ({"rule": "tp"}, r"needs optimizer=\.\.\."),
     ({"rule": "tp", "num_classes": 1, "opt": True}, "num_classes=<int >= 2>"),
     ({"rule": "sltt", "K": 0, "opt": True}, "K must be a positive int"),
     ({"rule": "sltt", "loss": "hinge", "opt": True}, "unknown loss 'hinge'")],
    ids=["unknown rule", "tp without optimizer", "tp one class", "K=0", "unknown loss"],
)
def test_bad_wrap_options(options, message):
    model = make_model()
    before = snapshot(model)
    options = dict(options)
    if options.pop("opt", False):
        options["optimizer"] = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ValueError, match=message):
        slr.wrap(model, **options)
    assert_same_snapshot(before, snapshot(model)) and slr.learner_of(model) is None


def test_wrap_things_that_are_not_spiking_models():
    with pytest.raises(slr.UnsupportedModelError, match="needs a torch.nn.Module"):
        slr.wrap(lambda x: x)
    with pytest.raises(slr.UnsupportedModelError, match="no spiking neuron layer"):
        slr.wrap(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


# -- modules that need the whole sequence per call -----------------------------------------------
def _time_tied(kind):
    """Conv - <module sized for T> - LIF - readout, multi-step; None where this release lacks the module."""
    make = {
        "TEBN": lambda: layer.TemporalEffectiveBatchNorm2d(T, 4),
        "MDA": lambda: layer.MultiDimensionalAttention(T, 4, reduction_t=2, reduction_c=2),
        "TWA": lambda: layer.TemporalWiseAttention(T, reduction=2, dimension=4),
    }[kind]
    torch.manual_seed(0)
    try:  # (SpikingJelly 0.0.0.0.14's attention layers are no nn.Module, or need einops)
        return nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode="m"), make(),
                             neuron.LIFNode(tau=2.0, step_mode="m"), layer.Flatten(step_mode="m"),
                             layer.Linear(4 * 5 * 5, C, step_mode="m"))
    except (AttributeError, TypeError, ImportError):
        return None


@pytest.mark.parametrize("kind", ["TEBN", "MDA", "TWA"])
@pytest.mark.parametrize("options", [dict(rule="tp", num_classes=C), dict(rule="sltt", K=2),
                                     dict(rule="sltt", chunk="auto", max_memory=2 ** 30),
                                     dict(rule="sltt", chunk=2, T=T), dict(rule="sltt"), dict(rule="sltt", chunk=3)],
                         ids=["tp", "K", "auto", "chunk-2-T", "chunk-1", "chunk-3"])
def test_a_module_sized_for_T_is_refused_where_calls_hold_part_of_a_sequence(kind, options):
    """A temporal-effective batch norm (one scale per step) or a temporal attention (weights sized for T)
    computes on whole sequences: fed one step or a chunk, TP silently trained scale[0] alone and online SLTT
    failed in torch's shapes. Refused, naming the module and the fix, at wrap or at the first step, with the
    model unchanged."""
    model = _time_tied(kind)
    if model is None:
        pytest.skip(f"this SpikingJelly has no {kind}")
    x, y = torch.rand(T, B, 2, 5, 5) * 2, torch.arange(B) % C
    before = snapshot(model)
    options = dict(options)
    with pytest.raises(slr.UnsupportedModelError, match=r"'1' \(\w+\) .* whole sequence in every call.*zero-change"):
        learner = slr.wrap(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **options)
        learner.step(x, y)
    if slr.learner_of(model) is not None:
        slr.unwrap(model)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("kind", ["TEBN", "TWA"])
def test_a_module_sized_for_T_trains_online_at_chunk_T_as_in_zero_change_mode(kind):
    model = _time_tied(kind)
    if model is None:
        pytest.skip(f"this SpikingJelly has no {kind}")
    model = model.double()
    x, y = torch.rand(T, B, 2, 5, 5, dtype=torch.float64) * 2, torch.arange(B) % C
    twin = copy.deepcopy(model)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=1.0), chunk=T)
    learner.step(x, y)
    slr.wrap(twin, rule="sltt")
    sum(F.cross_entropy(o, y) for o in twin(x)).div(T).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0 or float(q.grad.abs().max()) == 0
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_a_delay_that_forgets_between_calls_is_refused_where_calls_hold_part_of_a_sequence():
    """SpikingJelly 0.0.0.0.14's multi-step Delay shifts the steps of each call and keeps no queue: fed a
    step per call, what follows it saw zeros only. The current release's Delay keeps a queue and trains."""
    probe = layer.Delay(1, step_mode="m")
    probe(torch.ones(1, 1, 2))
    forgets = not bool(probe(torch.zeros(1, 1, 2)).ne(0).any())
    torch.manual_seed(0)
    model = nn.Sequential(layer.Linear(6, 8, step_mode="m"), neuron.LIFNode(tau=2.0, step_mode="m"),
                          layer.Delay(1, step_mode="m"), layer.Linear(8, C, step_mode="m"))
    x, y = torch.rand(T, B, 6) * 3, torch.arange(B) % C
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    if forgets:
        with pytest.raises(slr.UnsupportedModelError, match=r"'2' \(Delay\) delays the steps within each call"):
            learner.step(x, y)
    else:
        learner.step(x, y)
    learner.unwrap()


# -- optimizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_an_optimizer_whose_step_needs_a_closure_is_refused_at_wrap(rule):
    """LBFGS was taken, then failed inside step() with torch's "missing 'closure'" after a batch of
    forwards and backwards."""
    model = make_model()
    before = snapshot(model)
    options = dict(num_classes=C) if rule == "tp" else {}
    with pytest.raises(slr.WrapError, match=r"LBFGS\.step\(\) needs a closure.*zero-change mode"):
        slr.wrap(model, rule=rule, optimizer=torch.optim.LBFGS(model.parameters()), **options)
    assert slr.learner_of(model) is None
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("rule", RULES)
def test_a_replaced_optimizer_is_checked_and_then_stepped(rule):
    """learner.optimizer = another one (a fine-tuning phase): an optimizer of another model was taken and
    stepped nothing while the model's .grad piled up; now it is refused as at wrap, and a good one is used."""
    model, _, learner = make_learner(rule)
    other = make_model()
    with pytest.raises(slr.WrapError, match="holds none of the model's parameters"):
        learner.optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(slr.WrapError, match="not added or taken away"):
        learner.optimizer = None
    replacement = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    learner.optimizer = replacement
    before = [p.detach().clone() for p in model.parameters()]
    learner.step(*batch())
    assert replacement.state and all(replacement.state[p] for p in model.parameters() if p.grad is not None)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert "optimizer" in learner.state_dict() or rule == "tp"
    learner.unwrap()


def test_zero_change_mode_takes_no_optimizer_afterwards():
    model = make_model()
    learner = slr.wrap(model, rule="sltt")
    with pytest.raises(slr.WrapError, match="not added or taken away"):
        learner.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert learner.optimizer is None
    learner.unwrap()


# -- the model's neurons changed after wrapping ---------------------------------------------------------
def _lif():
    return neuron.LIFNode(tau=2.0, v_threshold=0.3)


@pytest.mark.parametrize("change", ["append", "setitem", "setattr", "inside a new block"])
@pytest.mark.parametrize("mode", ["zero-change", "online", "tp"])
def test_a_neuron_put_into_a_wrapped_model_is_refused_where_it_is_put(change, mode):
    """A neuron appended or swapped in after wrap kept its time route unseen (zero-change: BPTT's gradient,
    0.02-0.05 off SLTT; online and TP: torch's "backward through the graph a second time"). torch's
    registration hook refuses it before it lands, naming it and the fix."""
    model = make_model()
    options = {"zero-change": {}, "online": dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
               "tp": dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=C)}[mode]
    learner = slr.wrap(model, rule="tp" if mode == "tp" else "sltt", **options)
    before = snapshot(model)
    with pytest.raises(slr.WrapError, match=r"module '(7|5|extra|7\.1)' .*LIFNode\) is a spiking neuron put into "
                                            r"this Sequential after it was wrapped.*learner\.unwrap\(\), change it"):
        if change == "append":
            model.append(_lif())
        elif change == "setitem":
            model[5] = _lif()
        elif change == "setattr":
            model.extra = _lif()
        else:
            model.append(nn.Sequential(layer.Linear(C, C), _lif()))
    assert_same_snapshot(before, snapshot(model))
    if mode != "zero-change":
        learner.step(*batch())
    learner.unwrap()
    model.append(_lif())  # unwrapped: the user's to change
    slr.wrap(model, rule="sltt").unwrap()


@pytest.mark.parametrize("rule", RULES)
def test_a_neuron_inserted_or_removed_around_the_registration_hook_is_refused_at_the_next_step(rule):
    """Sequential.insert and del write the module dict directly, past torch's registration hook: the next
    step() or predict() finds the change."""
    model, _, learner = make_learner(rule)
    model.insert(6, _lif())
    with pytest.raises(slr.WrapError, match=r"module '6' .*is a spiking neuron put into"):
        learner.step(*batch())
    with pytest.raises(slr.WrapError, match=r"module '6' .*is a spiking neuron put into"):
        learner.predict(batch()[0])
    del model[6]
    learner.step(*batch())  # as it was: trains
    del model[5]
    with pytest.raises(slr.WrapError, match=r"LIFNode.* was wrapped but is no longer in this Sequential"):
        learner.step(*batch())
    learner.unwrap()


@pytest.mark.parametrize("rule", RULES)
def test_changes_that_leave_the_neurons_alone_still_work_while_wrapped(rule):
    """A new head, a parametrization, another surrogate on a wrapped neuron: accepted (the helper's
    lifecycle checks found each trains as in a model built that way)."""
    model, opt, learner = make_learner(rule)
    model[6] = layer.Linear(16, C)
    opt.add_param_group({"params": model[6].parameters()})
    torch.nn.utils.parametrizations.weight_norm(model[4])
    model[3].surrogate_function = type(model[3].surrogate_function)()
    learner.step(*batch())
    learner.unwrap()


def test_wrap_and_unwrap_from_several_threads():
    """A thread pool of trials, each wrapping and unwrapping its own models: the registry of wrapped
    models was read while another thread changed it ("dictionary changed size during iteration", from a
    throwaway wrapped model dropped meanwhile)."""
    import sys
    import threading

    errors = []
    models = [nn.Sequential(layer.Linear(6, 10), neuron.LIFNode(), layer.Linear(10, 4)) for _ in range(4)]

    def trial(model):
        try:
            for _ in range(150):
                learner = slr.wrap(model, rule="sltt")
                throwaway = nn.Sequential(layer.Linear(6, 10), neuron.LIFNode())
                slr.wrap(throwaway, rule="sltt")
                del throwaway
                learner.unwrap()
        except Exception as error:  # pragma: no cover - the failure this test is about
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=trial, args=(model,)) for model in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]


# -- a loss written for the whole sequence -----------------------------------------------------------
@pytest.mark.parametrize("loss", [lambda out, y: F.cross_entropy(out.mean(0), y),
                                  lambda out, y: F.cross_entropy(out.transpose(0, 1).reshape(-1, C), y.repeat(T)),
                                  lambda out, y, weight: F.cross_entropy(out, y) * weight],
                         ids=["mean over time", "TET on [B, T, C]", "three arguments"])
def test_a_loss_written_for_the_whole_sequence_fails_with_the_shapes_it_got(loss):
    """Online rules call loss(o_t, y) per step: a loss of the sequence failed in torch's own words ("For 1D
    input, 1D target must have size 1", a TypeError on its arguments). Now a LossError names one step's
    shapes and zero-change mode, in step() and in diagnose(), with the model unchanged."""
    model, opt, learner = make_learner("sltt", loss=loss, warm=False)
    before = snapshot(model)
    with pytest.raises(slr.LossError, match=r"failed on one time step's output \(3, 5\) and labels \(3,\).*"
                                            r"zero-change mode"):
        learner.step(*batch())
    assert_same_snapshot(before, snapshot(model))
    learner.unwrap()
    with pytest.raises(slr.LossError, match=r"failed on one time step's output \(3, 5\)"):
        slr.diagnose(model, *batch(), loss=loss)


@pytest.mark.parametrize("bad", ["mem", 1.5, True])
@pytest.mark.parametrize("rule", RULES)
def test_an_output_choice_that_is_no_index_is_refused_at_wrap(rule, bad):
    """output='mem' was taken, then failed at the first step in a bare TypeError ('<=' between int and str),
    or was ignored on a model that returns one tensor."""
    model = make_model()
    options = dict(num_classes=C) if rule == "tp" else {}
    with pytest.raises(slr.WrapError, match=r"output must be an index .*got " + repr(bad).replace(".", r"\.")):
        slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), output=bad, **options)
    with pytest.raises(slr.WrapError, match="output must be an index"):
        slr.diagnose(model, *batch(), output=bad)
    assert slr.learner_of(model) is None


def test_a_neuron_put_into_a_block_added_after_wrapping_is_refused_too():
    model = make_model()
    learner = slr.wrap(model, rule="sltt")
    model.extra = nn.Sequential(layer.Linear(C, C))  # no neuron: the user's to add
    with pytest.raises(slr.WrapError, match=r"module 'extra\.1' .*is a spiking neuron put into"):
        model.extra.append(_lif())
    learner.unwrap()


def test_the_registration_watch_goes_once_nothing_is_wrapped():
    """Nothing of snn-localrules runs at torch's module registrations while no model is wrapped (building
    a 1000-layer model took 12x as long while a 1000-module model was wrapped, before the learner's own
    set of modules was asked)."""
    hooks = getattr(torch.nn.modules.module, "_global_module_registration_hooks", None)
    if hooks is None:
        pytest.skip("this torch keeps no global registration hooks")
    ours = lambda: [h for h in hooks.values() if getattr(h, "__module__", "").startswith("snn_localrules")]  # noqa: E731
    import gc

    from snn_localrules.wrap import _wrapped_items

    gc.collect()
    for _, lingering in _wrapped_items():  # learners earlier tests left wrapped
        lingering.unwrap()
    first, second = make_model(), make_model()
    a, b = slr.wrap(first, rule="sltt"), slr.wrap(second, rule="sltt")
    assert len(ours()) == 1
    a.unwrap()
    assert len(ours()) == 1
    b.unwrap()
    assert not ours()


def test_a_whole_sequence_layer_put_into_an_online_learners_model_is_refused():
    """A temporal-effective batch norm set in after a TP wrap trained scale[0] alone: named at the
    registration; zero-change mode, which calls the model on whole sequences, takes it (and a synapse
    filter: it cuts no carried state)."""
    if hasattr(layer, "TemporalEffectiveBatchNorm1d"):
        model, _, learner = make_learner("tp", warm=False)
        with pytest.raises(slr.WrapError, match=r"module '1' .*TemporalEffectiveBatchNorm1d\) is a layer that must "
                                                r"get whole sequences"):
            model[1] = layer.TemporalEffectiveBatchNorm1d(T, 16)
        learner.unwrap()
    model = make_model()
    learner = slr.wrap(model, rule="sltt")
    model.insert(4, layer.SynapseFilter(tau=2.0))  # zero-change: the model keeps its own routes
    learner.unwrap()


def test_a_module_taken_out_of_a_wrapped_model_is_the_users_again():
    """The registration watch kept counting a replaced head as part of the model: appending a neuron to it
    was refused, naming a place the module no longer had."""
    model = nn.Sequential(layer.Linear(12, 16), _lif(), nn.Sequential(layer.Linear(16, C)))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    old_head = model[2]
    model[2] = nn.Sequential(layer.Linear(16, C))
    old_head.append(_lif())  # no longer the wrapped model's
    with pytest.raises(slr.WrapError, match=r"module '2\.1' .*is a spiking neuron put into"):
        model[2].append(_lif())  # the new head is
    learner.step(*batch())
    learner.unwrap()


def test_a_named_loss_failing_on_the_models_output_passes_torchs_error_on():
    """The first-call hint is for losses of one's own: loss='ce' on an output of the wrong shape is the
    model's to fix, and torch says what it expected."""
    model = nn.Sequential(make_model(), nn.Unflatten(-1, (C, 1)))  # [B, C, 1]
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss="ce")
    with pytest.raises(RuntimeError) as caught:
        learner.step(*batch())
    assert not isinstance(caught.value, slr.LossError)
    learner.unwrap()


@pytest.mark.parametrize("rule", RULES)
def test_an_snntorch_neuron_built_for_export_without_a_surrogate_is_refused(rule):
    """Leaky(surrogate_disable=True) spikes through a Heaviside without gradient: online SLTT and TP trained
    the layers after it and left those before it as they were, without a word."""
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.5, init_hidden=True, surrogate_disable=True),
                          nn.Linear(16, C), snn.Leaky(beta=0.5, init_hidden=True, output=True))
    options = dict(num_classes=C) if rule == "tp" else {}
    learner = slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **options)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(slr.WrapError, match=r"'1' \(snntorch\.Leaky\) passes no gradient .*surrogate_disable=True"):
        learner.step(*batch())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model[1].spike_grad = __import__("snntorch.surrogate", fromlist=["atan"]).atan()
    learner.step(*batch())  # with a surrogate: trains
    learner.unwrap()


class _TutorialLoop(nn.Module):
    """snnTorch tutorial shape with init_hidden=True: forward loops over a fixed num_steps on a static
    input and returns the recordings (``count``: the spike count [B, C] instead)."""

    def __init__(self, count):
        super().__init__()
        snn = pytest.importorskip("snntorch")
        self.count = count
        self.fc1, self.lif1 = nn.Linear(12, 16), snn.Leaky(beta=0.6, init_hidden=True)
        self.fc2, self.lif2 = nn.Linear(16, C), snn.Leaky(beta=0.6, init_hidden=True, output=True)

    def forward(self, x):
        spikes = []
        for _ in range(6):
            spk, _ = self.lif2(self.fc2(self.lif1(self.fc1(x))))
            spikes.append(spk)
        return torch.stack(spikes).sum(0) if self.count else torch.stack(spikes)


def test_a_forward_that_loops_over_a_fixed_number_of_steps_is_named():
    """Fed x_seq, such a model failed with "add the time dimension" (it had one); returning a count, it ran
    T x num_steps neuron steps per batch without a word. Both now say that forward loops over time itself."""
    torch.manual_seed(0)
    x, y = torch.rand(T, B, 12) * 3, torch.arange(B) % C
    model = _TutorialLoop(count=False)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(slr.LayoutError, match="ran 6 times in each call fed one time step: its forward seems to "
                                              r"loop over time itself.*zero-change mode"):
        learner.step(x, y)
    learner.unwrap()
    model = _TutorialLoop(count=True)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(slr.OnlineLossWarning, match="ran 6 times in each call fed one time step"):
        learner.step(x, y)
    learner.unwrap()


@pytest.mark.parametrize("rule", RULES)
def test_a_stateful_layer_put_into_an_online_learners_model_is_taken_on(rule):
    """A dropout (its mask is state SpikingJelly keeps) or a synapse filter put in after wrapping has its
    state cut at each call, as one there at wrap time: the same update as a model wrapped with it (the
    first version of the registration watch refused both)."""
    def build(late):
        torch.manual_seed(0)
        model = make_model()
        if not late:
            model.insert(4, layer.SynapseFilter(tau=2.0))
            model.append(layer.Dropout(0.2))
        return model

    x, y = batch()
    updates = []
    for late in (False, True):
        model = build(late)
        learner = slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           **(dict(num_classes=C) if rule == "tp" else {}))
        if late:
            model.insert(4, layer.SynapseFilter(tau=2.0))  # past the registration hook: found at the step
            model.append(layer.Dropout(0.2))  # through it
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(1)
        learner.step(x, y)
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        learner.unwrap()
        assert not any(m._forward_pre_hooks for m in model.modules())
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_whole_sequence_layer_the_learner_took_may_be_set_again():
    if not hasattr(layer, "TemporalEffectiveBatchNorm1d"):
        pytest.skip("this SpikingJelly has no temporal-effective batch norm")
    torch.manual_seed(0)
    model = nn.Sequential(layer.Linear(12, 16, step_mode="m"), layer.TemporalEffectiveBatchNorm1d(T, 16),
                          neuron.LIFNode(step_mode="m"), layer.Linear(16, C, step_mode="m"))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), chunk=T)
    model[1] = model[1]
    model[1] = nn.Sequential(model[1])
    learner.step(*batch())
    learner.unwrap()


def test_a_neuron_used_at_three_places_is_not_taken_for_a_time_loop():
    import warnings

    lif = neuron.IFNode(v_threshold=0.3)
    model = nn.Sequential(layer.Linear(12, 16), lif, layer.Linear(16, 16), lif, layer.Linear(16, 16), lif,
                          layer.Linear(16, C))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", slr.OnlineLossWarning)
        learner.step(*batch())
    learner.unwrap()


def test_a_stray_dimension_in_the_output_is_not_blamed_on_the_labels():
    model = nn.Sequential(make_model(), nn.Unflatten(-1, (1, C)))  # [B, 1, C]
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss="ce")
    with pytest.raises(RuntimeError, match="Expected target size") as caught:
        learner.step(*batch())
    assert not isinstance(caught.value, slr.LossError)
    learner.unwrap()


def test_a_stateful_layer_put_into_a_block_taken_out_of_the_model_is_left_alone():
    """The registration watch took a synapse filter put into a block already taken out of the wrapped model
    for the model's, and cut its state: plain BPTT through that block elsewhere lost its time route."""
    model = nn.Sequential(layer.Linear(12, 16), nn.Sequential(nn.Identity()), _lif(), layer.Linear(16, C))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    block = model[1]
    model[1] = nn.Identity()
    block.append(layer.SynapseFilter(tau=4.0))
    assert not block[1]._forward_pre_hooks and not learner._carried
    learner.step(*batch())
    learner.unwrap()
