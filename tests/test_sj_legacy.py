"""SpikingJelly's legacy ``clock_driven`` neurons (0.0.0.0.14) and cupy-backed neurons under the wrapper.

Many published models pin SpikingJelly 0.0.0.0.14 and build ``clock_driven.neuron.MultiStepLIFNode(...,
backend='cupy')``. The references here are independent: plain autograd over the legacy neurons' equations
written out by hand (charge, Heaviside spike with the Sigmoid surrogate's derivative, reset), with the
membrane detached before every step (SLTT's temporal cut). A *cupy twin* is the object a user gets when a
model built with ``backend='cupy'`` on a GPU box is loaded on a machine without CuPy: built here with
``backend='torch'`` (construction with 'cupy' asserts CuPy is installed) and the attribute set afterwards.

The whole file is skipped where ``spikingjelly.clock_driven`` does not exist (SpikingJelly 2.0 removed it).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from conftest import assert_same_snapshot, snapshot
from snn_localrules.errors import UnsupportedModelError

pytest.importorskip(
    "spikingjelly.clock_driven", reason="this SpikingJelly has no legacy clock_driven package (2.0 removed it)"
)
from spikingjelly.clock_driven import functional, layer, neuron  # noqa: E402

T, B, F_IN, H, C = 6, 4, 7, 9, 3


# ---- the independent reference ---------------------------------------------------------------------
class _Spike(torch.autograd.Function):
    """Heaviside (z >= 0) forward; derivative of sigmoid(alpha z) backward (SpikingJelly's Sigmoid)."""

    @staticmethod
    def forward(ctx, z, alpha):
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return (z >= 0).to(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * z)
        return grad * ctx.alpha * s * (1 - s), None


def _charge(node, v, h):
    """The legacy charge equations, as clock_driven.neuron writes them (so rounding matches too)."""
    if isinstance(node, neuron.IFNode):
        return v + h
    v_reset = node.v_reset
    if isinstance(node, neuron.ParametricLIFNode):
        k = node.w.sigmoid()
        decay, keep = (lambda a: a * k), (lambda a: a * (1.0 - k))
    elif isinstance(node, neuron.LIFNode):
        tau = node.tau
        decay, keep = (lambda a: a / tau), (lambda a: a * (1.0 - 1.0 / tau))
    else:
        raise AssertionError(f"no hand-written equations for {type(node).__name__}")
    zero_rest = v_reset is None or v_reset == 0.0
    if node.decay_input:
        return v + decay(h - v) if zero_rest else v + decay(h - (v - v_reset))
    return keep(v) + h if zero_rest else v - decay(v - v_reset) + h


def _reference_neuron(node, h_seq):
    """One neuron over a whole sequence ``[T, B, ...]``, membrane cut before every step."""
    v_th, v_reset = node.v_threshold, node.v_reset
    v = torch.full_like(h_seq[0], 0.0 if v_reset is None else v_reset)
    spikes = []
    for h in h_seq:
        v = _charge(node, v.detach(), h)
        s = _Spike.apply(v - v_th, node.surrogate_function.alpha)
        r = s.detach() if node.detach_reset else s
        v = v - r * v_th if v_reset is None else (1.0 - r) * v + r * v_reset
        spikes.append(s)
    return torch.stack(spikes)


def _reference_forward(model, x_seq):
    h = x_seq
    for m in model:
        if isinstance(m, neuron.BaseNode):
            h = _reference_neuron(m, h)
        elif isinstance(m, layer.SeqToANNContainer):
            flat = h.flatten(0, 1)
            for inner in m:
                flat = inner(flat)
            h = flat.reshape(h.shape[0], h.shape[1], *flat.shape[1:])
        else:
            h = m(h)
    return h


def _loss(out_seq, y):
    return sum(F.cross_entropy(o, y) for o in out_seq) / len(out_seq)


def _reference_grads(model, x_seq, y):
    ref = copy.deepcopy(model)
    _loss(_reference_forward(ref, x_seq), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def _assert_grads(model, ref, rtol=1e-5, atol=1e-7):
    assert any(g.abs().sum() > 0 for g in ref.values()), "the reference has no gradient: a vacuous test"
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name], rtol=rtol, atol=atol, msg=name)


def _user_loop(model, x_seq, multi_step):
    """The user's own forward: one multi-step call, or a loop over time for single-step neurons."""
    return model(x_seq) if multi_step else torch.stack([model(x) for x in x_seq])


def _data(seed=0, scale=2.0, shape=(F_IN,)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((T, B, *shape), generator=g) * scale, torch.randint(0, C, (B,), generator=g)


# ---- models ---------------------------------------------------------------------------------------
MULTI_STEP = {
    # Spikformer-style settings
    "LIF_detach_reset": lambda: neuron.MultiStepLIFNode(tau=2.0, detach_reset=True),
    "LIF_soft_no_decay_input": lambda: neuron.MultiStepLIFNode(tau=1.5, v_reset=None, decay_input=False),
    "LIF_reset_nonzero": lambda: neuron.MultiStepLIFNode(tau=3.0, v_reset=-0.2),
    "IF": lambda: neuron.MultiStepIFNode(),
    "PLIF": lambda: neuron.MultiStepParametricLIFNode(init_tau=2.0),
}
SINGLE_STEP = {
    "IF": lambda: neuron.IFNode(v_reset=None),
    "LIF": lambda: neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.1),
    "PLIF": lambda: neuron.ParametricLIFNode(init_tau=1.5, detach_reset=True),
}


def _mlp(make):
    return nn.Sequential(nn.Linear(F_IN, H), make(), nn.Linear(H, C), make())


def _conv(make, bn=True):
    return nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), *([nn.BatchNorm2d(4)] if bn else [])),
        make(),
        layer.SeqToANNContainer(nn.Flatten(), nn.Linear(4 * 5 * 5, C)),
        make(),
    )


def _cupy_twin(model):
    """The same model with every neuron's backend set to 'cupy' after construction."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if "backend" in vars(m):  # clock_driven MultiStep*: a plain attribute
            m.backend = "cupy"
        elif "_backend" in vars(m):  # activation_based (0.0.0.0.14): a property whose setter checks for CuPy
            m.__dict__["_backend"] = "cupy"
    return twin


# ---- recognition and step mode --------------------------------------------------------------------
def test_legacy_neurons_are_recognised_with_their_step_mode():
    class MyMultiStep(neuron.MultiStepLIFNode):  # a user subclass that changes nothing of the forward
        pass

    liaf = neuron.LIAFNode(act=torch.tanh, threshold_related=True)  # overrides forward, one step at a time
    model = nn.Sequential(
        nn.Linear(F_IN, H), neuron.MultiStepLIFNode(), neuron.MultiStepIFNode(), MyMultiStep(),
        neuron.MultiStepParametricLIFNode(), neuron.MultiStepEIFNode(),
    )
    learner = slr.wrap(model, rule="sltt")
    assert [n.multi_step for n in learner.neurons] == [True] * 5
    assert learner.neurons[0].describe() == "spikingjelly.clock_driven.MultiStepLIFNode"
    learner.unwrap()
    single = nn.Sequential(neuron.IFNode(), neuron.LIFNode(), neuron.ParametricLIFNode(), neuron.EIFNode(),
                           neuron.QIFNode(), liaf)
    learner = slr.wrap(single, rule="sltt")
    assert [n.multi_step for n in learner.neurons] == [False] * 6
    assert not any(n.supports_multi_step for n in learner.neurons)
    learner.unwrap()


def test_multi_step_neuron_with_own_sequence_forward_is_refused():
    class Scaled(neuron.MultiStepLIFNode):
        def forward(self, x_seq):
            return super().forward(x_seq * 2)  # stepping LIFNode.forward would skip the * 2

    model = nn.Sequential(nn.Linear(F_IN, H), Scaled())
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="Scaled"):
        slr.wrap(model, rule="sltt")
    assert_same_snapshot(before, snapshot(model))


def test_neuron_listing_names_legacy_classes():
    names = {(n.name, n.notes) for n in slr.neurons() if n.name.startswith("clock_driven.")}
    assert ("clock_driven.LIFNode", "clock_driven, single-step") in names
    assert any(name == "clock_driven.MultiStepLIFNode" and "multi-step" in notes for name, notes in names)


# ---- SLTT gradients against the hand-written reference ---------------------------------------------
@pytest.mark.parametrize("kind", sorted(MULTI_STEP))
def test_multi_step_mlp_zero_change_sltt_gradients(kind):
    model = _mlp(MULTI_STEP[kind])
    x, y = _data()
    ref = _reference_grads(model, x, y)
    bptt = copy.deepcopy(model)  # the unwrapped model is BPTT: it must differ, or the test proves nothing
    _loss(bptt(x), y).backward()
    learner = slr.wrap(model, rule="sltt")
    out = model(x)
    _loss(out, y).backward()
    assert out.shape == (T, B, C)
    _assert_grads(model, ref)
    assert model[1].v_seq.shape == (T, B, H)  # the MultiStep* contract: every step's membrane
    assert any(not torch.allclose(p.grad, q.grad) for p, q in zip(model.parameters(), bptt.parameters()))
    learner.unwrap()


@pytest.mark.parametrize("bn", [True, False])
def test_multi_step_conv_seq_to_ann_zero_change_sltt_gradients(bn):
    model = _conv(MULTI_STEP["LIF_detach_reset"], bn=bn)
    x, y = _data(shape=(2, 5, 5))
    ref = _reference_grads(model, x, y)
    learner = slr.wrap(model, rule="sltt")
    _loss(model(x), y).backward()
    _assert_grads(model, ref)
    learner.unwrap()


@pytest.mark.parametrize("kind", sorted(SINGLE_STEP))
def test_single_step_zero_change_sltt_gradients(kind):
    model = _mlp(SINGLE_STEP[kind])
    x, y = _data()
    ref = _reference_grads(model, x, y)
    learner = slr.wrap(model, rule="sltt")
    _loss(_user_loop(model, x, multi_step=False), y).backward()
    _assert_grads(model, ref)
    if kind == "PLIF":
        assert model[1].w.grad.abs() > 0  # the learnable time constant is trained
    learner.unwrap()


@pytest.mark.parametrize("kind", ["LIF_detach_reset", "PLIF", "IF"])
def test_multi_step_online_sltt_gradients(kind):
    model = _mlp(MULTI_STEP[kind])
    x, y = _data()
    ref = _reference_grads(model, x, y)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    learner = slr.wrap(model, rule="sltt", optimizer=opt)
    stats = learner.step(x, y)
    _assert_grads(model, ref)  # the optimizer leaves .grad in place after its step
    for p0, (name, p) in zip(start, model.named_parameters()):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert stats.T == T
    learner.unwrap()


@pytest.mark.parametrize("chunk", [1, 3])
def test_single_step_neurons_in_a_multi_step_container_train_online_as_multi_step_neurons(chunk):
    """clock_driven.layer.MultiStepContainer around single-step neurons makes a model that takes [T, B, ...]:
    the online learner feeds it chunks (no multi_step=True needed), with the same update as the same
    network built from MultiStep* neurons."""
    torch.manual_seed(0)
    twin = _conv(MULTI_STEP["LIF_detach_reset"])
    model = _conv(lambda: layer.MultiStepContainer(neuron.LIFNode(tau=2.0, detach_reset=True)))
    model.load_state_dict(twin.state_dict())
    x, y = _data(shape=(2, 5, 5))
    for net in (twin, model):
        learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.0), chunk=chunk)
        learner.step(x, y)
        learner.unwrap()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_subclass_of_a_legacy_multi_step_container_is_seen_too():
    class Mine(layer.MultiStepContainer):
        pass

    model = _conv(lambda: Mine(neuron.LIFNode(tau=2.0, detach_reset=True)))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert learner._sequence_model()
    learner.step(*_data(shape=(2, 5, 5)))
    learner.unwrap()


def test_single_step_online_sltt_gradients():
    model = _mlp(SINGLE_STEP["PLIF"])
    x, y = _data()
    ref = _reference_grads(model, x, y)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    learner.step(x, y)
    _assert_grads(model, ref)
    learner.unwrap()


def test_legacy_and_activation_based_neurons_train_alike():
    """The same LIF network built from clock_driven and from activation_based (step_mode='m') neurons
    gets the same SLTT update and the same TP update."""
    from spikingjelly.activation_based import neuron as ab_neuron

    def readout_mlp(make):  # TP's usual form: spiking hidden layers, a linear readout
        return nn.Sequential(nn.Linear(F_IN, H), make(), nn.Linear(H, H), make(), nn.Linear(H, C))

    legacy = readout_mlp(lambda: neuron.MultiStepLIFNode(tau=2.0, v_threshold=0.3, detach_reset=True))
    modern = readout_mlp(lambda: ab_neuron.LIFNode(tau=2.0, v_threshold=0.3, detach_reset=True, step_mode="m"))
    modern.load_state_dict(legacy.state_dict())
    x, y = _data(scale=6.0)
    for rule, options in (("sltt", {}), ("tp", {"num_classes": C, "seed": 3})):
        results = []
        for model in (copy.deepcopy(legacy), copy.deepcopy(modern)):
            learner = slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.3), **options)
            stats = learner.step(x, y)
            results.append((stats.loss, [p.detach().clone() for p in model.parameters()]))
            learner.unwrap()
        (loss_a, params_a), (loss_b, params_b) = results
        assert loss_a == pytest.approx(loss_b, rel=1e-6), rule
        for a, b in zip(params_a, params_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- cupy-backed twins ------------------------------------------------------------------------------
def test_unwrapped_cupy_twin_fails_here():
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    twin = _cupy_twin(model)
    x, _ = _data()
    model(x)  # the torch backend runs
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run the cupy kernels")
    with pytest.raises(Exception):
        twin(x)


@pytest.mark.parametrize("kind", ["LIF_detach_reset", "PLIF", "IF"])
def test_cupy_twin_zero_change_equals_torch_twin(kind):
    model = _mlp(MULTI_STEP[kind])
    twin = _cupy_twin(model)
    x, y = _data()
    results = []
    for m in (model, twin):
        learner = slr.wrap(m, rule="sltt")
        out = m(x)
        _loss(out, y).backward()
        results.append((out.detach(), m[1].v_seq.detach(), [p.grad for p in m.parameters()]))
        learner.unwrap()
    (out_a, v_a, g_a), (out_b, v_b, g_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(v_a, v_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
    assert twin[1].backend == "cupy"  # the user's setting is left alone


def _assert_same_online_training(model, twin, batches):
    """Online SLTT on both models, the same batches: equal losses and parameters, bit for bit."""
    losses = []
    for m in (model, twin):
        learner = slr.wrap(m, rule="sltt", optimizer=torch.optim.SGD(m.parameters(), lr=0.5))
        losses.append([learner.step(*_data(seed)).loss for seed in range(batches)])
        learner.unwrap()
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_cupy_twin_online_equals_torch_twin():
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    twin = _cupy_twin(model)
    _assert_same_online_training(model, twin, batches=3)


def test_cupy_twin_own_forward_runs_in_torch_without_grad():
    """Inference of a wrapped cupy twin (no_grad) runs the torch multi-step forward where CuPy cannot."""
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    twin = _cupy_twin(model)
    x, _ = _data()
    with torch.no_grad():
        expected = model(x)
        learner = slr.wrap(twin, rule="sltt")
        h = twin[0](x)
        s = learner.neurons[0].own_forward(h)
        out = learner.neurons[1].own_forward(twin[2](s))
    assert torch.equal(out, expected)
    assert torch.equal(twin[3].v_seq, model[3].v_seq)
    learner.unwrap()


def test_cupy_twin_predict_tp_and_sltt_k():
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    twin = _cupy_twin(model)
    x, y = _data()
    for rule, options in (("sltt", {"K": 2, "seed": 1}), ("tp", {"num_classes": C, "seed": 3})):
        answers = []
        for m in (copy.deepcopy(model), copy.deepcopy(twin)):
            learner = slr.wrap(m, rule=rule, optimizer=torch.optim.SGD(m.parameters(), lr=0.3), **options)
            answers.append((learner.step(x, y).loss, learner.predict(x)))
            learner.unwrap()
        assert answers[0][0] == answers[1][0] and torch.equal(answers[0][1], answers[1][1])


def _activation_based_cupy_pair():
    from spikingjelly.activation_based import neuron as ab_neuron

    probe = ab_neuron.LIFNode(step_mode="m")
    if "_backend" not in vars(probe) or "cupy" not in probe.supported_backends:
        pytest.skip("this SpikingJelly's activation_based neurons have no cupy backend attribute")
    model = _mlp(lambda: ab_neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m"))
    return model, _cupy_twin(model)


def test_activation_based_cupy_twin_under_the_wrapper():
    model, twin = _activation_based_cupy_pair()
    x, y = _data()
    if not torch.cuda.is_available():
        with pytest.raises(Exception):
            twin(x)  # training mode: the cupy kernel
    from spikingjelly.activation_based import functional as ab_functional

    ab_functional.reset_net(twin)
    outs, grads = [], []
    for m in (model, twin):
        learner = slr.wrap(m, rule="sltt")
        out = m(x)
        _loss(out, y).backward()
        outs.append(out.detach())
        grads.append([p.grad for p in m.parameters()])
        learner.unwrap()
    assert torch.equal(*outs)
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and any(g.abs().sum() > 0 for g in grads[0])
    _assert_same_online_training(model, twin, batches=2)


# ---- unwrap, reset_net, other memory modules --------------------------------------------------------
def _legacy_state(model):
    return [
        (n, type(m), sorted(vars(m)), {k: v for k, v in m._memories.items() if not isinstance(v, torch.Tensor)})
        for n, m in model.named_modules() if hasattr(m, "_memories")
    ]


@pytest.mark.parametrize("twin", [False, True])
def test_unwrap_restores_the_model(twin):
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    if twin:
        model = _cupy_twin(model)
    x, y = _data()
    functional.reset_net(model)
    before, state = snapshot(model), _legacy_state(model)
    expected = None if twin else model(x)
    functional.reset_net(model)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    learner.step(x, y)
    learner.unwrap()
    functional.reset_net(model)
    assert_same_snapshot(before, snapshot(model))
    assert _legacy_state(model) == state
    if twin:
        if not torch.cuda.is_available():
            with pytest.raises(Exception):
                model(x)  # its own cupy forward is back
    else:
        assert torch.equal(model(x), expected)


def test_reset_net_after_wrapping():
    model = _mlp(MULTI_STEP["LIF_detach_reset"])
    x, y = _data()
    fresh = copy.deepcopy(model)
    learner = slr.wrap(model, rule="sltt")
    first = model(x)
    assert isinstance(model[1].v, torch.Tensor)
    functional.reset_net(model)
    assert model[1].v == 0.0 and model[1].v_seq is None and model[3].v == 0.0
    assert torch.equal(model(x), first)
    assert torch.equal(first, fresh(x))
    learner.unwrap()


def test_learner_resets_legacy_dropout_masks():
    model = nn.Sequential(nn.Linear(F_IN, H), neuron.MultiStepLIFNode(), layer.MultiStepDropout(0.5),
                          nn.Linear(H, C), neuron.MultiStepLIFNode())
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model(_data()[0])
    assert model[2].mask is not None
    learner.step(*_data())
    assert model[2].mask is None  # reset with the neurons after the batch: the next batch draws its own
    learner.unwrap()


def _add(y, x):
    return y + x


def test_legacy_recurrent_container_sltt_gradients():
    """The fed-back output of a legacy recurrent container is carried state: cut at every step too."""
    model = nn.Sequential(nn.Linear(F_IN, H), layer.ElementWiseRecurrentContainer(neuron.LIFNode(tau=2.0), _add),
                          nn.Linear(H, C), neuron.LIFNode(tau=2.0))
    x, y = _data()
    ref = copy.deepcopy(model)
    h_seq = ref[0](x)
    cell = ref[1].sub_module
    v, fed, hidden = torch.zeros_like(h_seq[0]), torch.zeros_like(h_seq[0]), []
    for h in h_seq:
        v = _charge(cell, v.detach(), fed.detach() + h)
        s = _Spike.apply(v - cell.v_threshold, cell.surrogate_function.alpha)
        v = (1.0 - s) * v + s * cell.v_reset
        fed = s
        hidden.append(s)
    _loss(_reference_neuron(ref[3], ref[2](torch.stack(hidden))), y).backward()
    learner = slr.wrap(model, rule="sltt")
    assert [(type(n.module).__name__, n.is_layer) for n in learner.neurons] == [
        ("ElementWiseRecurrentContainer", False), ("LIFNode", True), ("LIFNode", True)]
    _loss(_user_loop(model, x, multi_step=False), y).backward()
    _assert_grads(model, {n: p.grad for n, p in ref.named_parameters()})
    learner.unwrap()


# ---- fused SLTT for activation_based neurons before 2.0 (no materialize_states) ------------------------
def _older_activation_based():
    from spikingjelly.activation_based import neuron as ab_neuron

    if callable(getattr(ab_neuron.LIFNode(), "materialize_states", None)):
        pytest.skip("neurons with materialize_states (2.0): their fused path is tested in test_sltt_multistep")
    return ab_neuron


FUSABLE = {
    "IF_hard": lambda n: n.IFNode(step_mode="m"),
    "IF_soft": lambda n: n.IFNode(v_reset=None, step_mode="m"),
    "LIF_decay": lambda n: n.LIFNode(tau=2.0, step_mode="m"),
    "LIF_decay_soft_detach": lambda n: n.LIFNode(tau=1.7, v_reset=None, detach_reset=True, step_mode="m"),
    "LIF_decay_reset": lambda n: n.LIFNode(tau=2.5, v_reset=-0.3, step_mode="m"),
    "LIF_no_decay_reset": lambda n: n.LIFNode(tau=3.0, decay_input=False, v_reset=0.2, step_mode="m"),
    "PLIF_decay": lambda n: n.ParametricLIFNode(init_tau=2.0, step_mode="m"),
    "PLIF_no_decay_reset": lambda n: n.ParametricLIFNode(init_tau=1.5, decay_input=False, v_reset=-0.1,
                                                         step_mode="m"),
}
NOT_FUSABLE = {
    # v * (1 - 1/tau) + x in SpikingJelly 0.0.0.0.14 against v - v/tau + x fused: another rounding
    "LIF_no_decay_rest0": lambda n: n.LIFNode(tau=2.0, decay_input=False, step_mode="m"),
    "PLIF_no_decay_soft": lambda n: n.ParametricLIFNode(decay_input=False, v_reset=None, step_mode="m"),
    "LIF_store_v_seq": lambda n: n.LIFNode(store_v_seq=True, step_mode="m"),
}


@pytest.mark.parametrize("kind", sorted(FUSABLE))
def test_older_fused_forward_equals_the_neurons_own(kind):
    ab_neuron = _older_activation_based()
    node = FUSABLE[kind](ab_neuron)
    own = copy.deepcopy(node)
    learner = slr.wrap(nn.Sequential(node), rule="sltt")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second call starts from the membrane the first one left
        x = torch.randn((3 * T, B, 33), generator=g) * 1.5 + 0.6
        fused = learner.neurons[0].fused_sltt_multi_step(x)
        assert fused is not None, "declined to fuse"
        expected = own(x)
        assert torch.equal(fused, expected) and 0 < expected.mean() < 1
        torch.testing.assert_close(node.v, own.v, rtol=0, atol=1e-6)
    assert "v_seq" not in vars(node) and "v_seq" not in node._memories
    learner.unwrap()


@pytest.mark.parametrize("kind", sorted(NOT_FUSABLE))
def test_older_fused_declines_where_forms_differ(kind):
    ab_neuron = _older_activation_based()
    model = nn.Sequential(NOT_FUSABLE[kind](ab_neuron))
    learner = slr.wrap(model, rule="sltt")
    assert learner.neurons[0].fused_sltt_multi_step(torch.rand(T, B, 5)) is None
    learner.unwrap()


def test_older_fused_declines_in_eval_mode():
    ab_neuron = _older_activation_based()
    model = nn.Sequential(ab_neuron.LIFNode(step_mode="m")).eval()  # eval: a Heaviside without surrogate
    learner = slr.wrap(model, rule="sltt")
    assert learner.neurons[0].fused_sltt_multi_step(torch.rand(T, B, 5)) is None
    learner.unwrap()


@pytest.mark.parametrize("kind", ["LIF_decay_soft_detach", "PLIF_decay", "PLIF_no_decay_reset", "IF_hard"])
def test_older_fused_gradients_equal_stepped(kind):
    ab_neuron = _older_activation_based()
    model = nn.Sequential(nn.Linear(F_IN, H), FUSABLE[kind](ab_neuron), nn.Linear(H, C), FUSABLE[kind](ab_neuron))
    x, y = _data(scale=3.0)
    grads = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        learner = slr.wrap(m, rule="sltt", fused=fused)
        ran = []
        for adapter in learner.neurons:  # record whether each multi-step call was fused
            def spy(x_seq, original=adapter.fused_sltt_multi_step):
                out = original(x_seq)
                ran.append(out is not None)
                return out
            adapter.fused_sltt_multi_step = spy  # an attribute of our adapter object, not of the model
        _loss(m(x), y).backward()
        assert ran == ([True, True] if fused else [])  # fused=False: the fused path is never asked
        grads.append({n: p.grad for n, p in m.named_parameters()})
        learner.unwrap()
    _assert_grads_between(*grads)


def _assert_grads_between(a, b):
    assert any(g.abs().sum() > 0 for g in b.values())
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", sorted(MULTI_STEP))
def test_online_cuda_graphs_equal_eager(monkeypatch, kind):
    """Online SLTT with (emulated, tests/graph_emulator.py) CUDA graphs trains legacy neurons exactly as
    eager steps do; the legacy state (v, and v_seq for MultiStep*) is carried through the static buffers."""
    from tests.graph_emulator import emulate

    def train(model, cuda_graphs):
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                           cuda_graphs=cuda_graphs)
        losses = [learner.step(*_data(seed, shape=(2, 5, 5))).loss for seed in range(3)]
        return learner, losses

    model = _conv(MULTI_STEP[kind])
    twin = copy.deepcopy(model)
    _, eager = train(model, False)
    made = emulate(monkeypatch)
    learner, graphed = train(twin, True)
    assert learner.graphs.off is None and sum(g.replays for g in made) > 0
    assert graphed == eager
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ---- on a GPU: models built with backend='cupy' for real ----------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and CuPy)")
@pytest.mark.parametrize("package", ["clock_driven", "activation_based"])
@pytest.mark.parametrize("mode", ["zero-change", "online"])
def test_cupy_built_model_on_gpu_trains_like_its_torch_twin(package, mode):
    """A model built on a GPU with ``backend='cupy'`` (what published 0.0.0.0.14 models pin) trains under
    the wrapper, on CUDA tensors, as its torch-backend twin does: the wrapper steps the neurons with the
    torch equations whatever the backend (SpikingJelly's cupy path of 0.0.0.0.14 needs ``np.int``, gone
    from numpy 1.24 on)."""
    pytest.importorskip("cupy")
    if package == "clock_driven":
        def make(backend):
            return neuron.MultiStepLIFNode(tau=2.0, detach_reset=True, backend=backend)
    else:
        from spikingjelly.activation_based import neuron as ab_neuron

        def make(backend):
            return ab_neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m", backend=backend)
    torch.manual_seed(0)
    model = _conv(lambda: make("torch")).cuda()
    twin = _conv(lambda: make("cupy")).cuda()
    twin.load_state_dict(model.state_dict())
    data = [tuple(t.cuda() for t in _data(seed, shape=(2, 5, 5))) for seed in range(3)]
    results = []
    for m in (model, twin):
        if mode == "online":
            learner = slr.wrap(m, rule="sltt", optimizer=torch.optim.SGD(m.parameters(), lr=0.5))
            losses = [learner.step(x, y).loss for x, y in data]
            results.append((losses, [p.detach().clone() for p in m.parameters()]))
        else:
            learner = slr.wrap(m, rule="sltt")
            x, y = data[0]
            _loss(m(x), y).backward()
            results.append(([], [p.grad.clone() for p in m.parameters()]))
        learner.unwrap()
    (losses_a, tensors_a), (losses_b, tensors_b) = results
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    for a, b in zip(tensors_a, tensors_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(t.abs().sum() > 0 for t in tensors_a)
