"""wrap/unwrap guarantees and the errors of the SLTT rule."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from conftest import assert_same_snapshot, snapshot
from models import LoopsOverTime, TutorialNet, sj_conv, sj_mlp, snn_sequential

pytest.importorskip("spikingjelly")
pytest.importorskip("snntorch")

MODELS = {
    "sj_single": lambda: sj_mlp(step_mode="s"),
    "sj_multi": lambda: sj_mlp(step_mode="m"),
    "sj_conv_multi": lambda: sj_conv("m"),
    "snntorch_leaky": lambda: snn_sequential("Leaky"),
    "snntorch_synaptic": lambda: snn_sequential("Synaptic"),
    "snntorch_tutorial": TutorialNet,
}


def _input(name, T=4, B=3):
    if name.startswith("sj_conv"):
        return torch.rand(T, B, 2, 8, 8), torch.randint(0, 5, (B,))
    return torch.rand(T, B, 12) * 2, torch.randint(0, 5, (B,))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("online", [False, True])
def test_unwrap_restores_model(name, online):
    model = MODELS[name]()
    if online and name == "snntorch_tutorial":
        pytest.skip("online mode refuses explicit-state models (tested below)")
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if online else None
    learner = slr.wrap(model, rule="sltt", optimizer=opt) if online else slr.wrap(model, rule="sltt")
    assert slr.learner_of(model) is learner
    x, y = _input(name)
    if online:
        learner.step(x, y)
        before["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}  # trained
    assert slr.unwrap(model) is model
    assert_same_snapshot(before, snapshot(model))
    assert slr.learner_of(model) is None
    learner.unwrap()  # idempotent


def test_wrapping_a_model_that_shares_neurons_with_a_wrapped_one_is_refused():
    for make in (sj_mlp, snn_sequential):
        net = make()
        learner = slr.wrap(net, rule="sltt")
        hooks = [len(m._forward_pre_hooks) for m in net.modules()]
        for other in (net[:2], nn.Sequential(net)):
            with pytest.raises(slr.WrapError, match=r"already wrapped by rule 'sltt' as part of another "
                                                    r"Sequential.*unwrap that one first"):
                slr.wrap(other, rule="sltt")
        assert [len(m._forward_pre_hooks) for m in net.modules()] == hooks
        learner.unwrap()
        slr.wrap(net[:2], rule="sltt").unwrap()  # free again


def test_wrap_twice_and_unwrap_unwrapped():
    model = sj_mlp()
    learner = slr.wrap(model, rule="sltt")
    with pytest.raises(slr.WrapError, match="already wrapped.*unwrap"):
        slr.wrap(model, rule="sltt")
    learner.unwrap()
    with pytest.raises(slr.WrapError, match="not wrapped"):
        slr.unwrap(model)
    slr.wrap(model, rule="sltt").unwrap()  # wrapping again after unwrap works


def test_no_neuron_and_unknown_neuron_class():
    with pytest.raises(slr.UnsupportedModelError, match="no spiking neuron layer"):
        slr.wrap(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), rule="sltt")

    class MyLIFNeuron(nn.Module):
        def forward(self, x):
            return (x > 1).float()

    with pytest.raises(slr.UnsupportedModelError, match="MyLIFNeuron.*adapter"):
        slr.wrap(nn.Sequential(nn.Linear(3, 3), MyLIFNeuron()), rule="sltt")
    with pytest.raises(slr.UnsupportedModelError, match="nn.Module"):
        slr.wrap("not a model", rule="sltt")
    # beside a supported neuron, an unsupported one would keep its temporal route: a warning names it
    model = sj_mlp()
    model.append(MyLIFNeuron())
    with pytest.warns(UserWarning, match=r"look like spiking neurons.*4 \(.*MyLIFNeuron\).*register an adapter"):
        learner = slr.wrap(model, rule="sltt")
    assert [n.module for n in learner.neurons] == [model[1], model[3]]
    learner.unwrap()


def test_a_look_alike_neuron_holding_child_modules_is_named():
    """SpikingJelly's idiom keeps the surrogate function as a child module (snnTorch 1.0's LinearLeaky a
    linear map): such a neuron is named alone and beside supported ones; a block around a neuron, or a
    network class whose name says 'spiking', is not."""
    from spikingjelly.activation_based import surrogate

    class MyNode(nn.Module):
        def __init__(self):
            super().__init__()
            self.v_threshold, self.v = 1.0, 0.0
            self.surrogate_function = surrogate.ATan()

        def forward(self, x):
            self.v = self.v + x
            spike = self.surrogate_function(self.v - self.v_threshold)
            self.v = self.v - spike
            return spike

    with pytest.raises(slr.UnsupportedModelError, match=r"look like neurons.*1 \(.*MyNode\)"):
        slr.wrap(nn.Sequential(nn.Linear(3, 3), MyNode()), rule="sltt")
    model = sj_mlp()
    model.append(MyNode())
    with pytest.warns(UserWarning, match=r"time steps\): 4 \(.*MyNode\)\. If"):
        slr.wrap(model, rule="sltt").unwrap()

    class SpikingBlock(nn.Module):  # a block with a threshold of its own around a look-alike
        def __init__(self):
            super().__init__()
            self.threshold = 0.5
            self.fc, self.node = nn.Linear(4, 4), MyNode()

    with pytest.warns(UserWarning, match=r"time steps\): 4\.node \(.*MyNode\)\. If"):
        slr.wrap(sj_mlp().append(SpikingBlock()), rule="sltt").unwrap()

    class SpikingNet(nn.Module):  # a network whose name says 'spiking' holds supported neurons
        def __init__(self):
            super().__init__()
            self.body = sj_mlp()

    class TokenPruner(nn.Module):  # a threshold that is no neuron's
        def __init__(self):
            super().__init__()
            self.threshold, self.score = 0.5, nn.Linear(5, 1)

    class MemoryTokens(nn.Module):  # a 'mem' that is no membrane
        def __init__(self):
            super().__init__()
            self.mem, self.proj = nn.Parameter(torch.zeros(4, 5)), nn.Linear(5, 5)

    class IzhCell(nn.Module):  # no neuron word in its name, but a threshold and a membrane
        def __init__(self):
            super().__init__()
            self.threshold, self.mem = 1.0, 0.0
            self.surrogate_function = surrogate.ATan()

    with pytest.warns(UserWarning, match=r"time steps\): 4 \(.*IzhCell\)\. If"):
        slr.wrap(sj_mlp().append(IzhCell()), rule="sltt").unwrap()

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slr.wrap(nn.Sequential(SpikingNet()), rule="sltt").unwrap()
        slr.wrap(sj_mlp().append(TokenPruner()).append(MemoryTokens()), rule="sltt").unwrap()


def test_parts_of_a_supported_neuron_are_not_look_alikes():
    """A surrogate module inside a neuron (SpikingJelly's LeakyKReLU, PiecewiseLeakyReLU) is part of it."""
    import warnings

    from spikingjelly.activation_based import surrogate

    for name in ("LeakyKReLU", "PiecewiseLeakyReLU"):
        if not hasattr(surrogate, name):
            continue
        model = sj_mlp(surrogate_function=getattr(surrogate, name)())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            learner = slr.wrap(model, rule="sltt")
        learner.unwrap()


def test_an_unsupported_neuron_inside_a_recurrent_container_is_still_named():
    """A recurrent container is supported, but the neuron it wraps may not be: that one keeps its state."""
    from spikingjelly.activation_based import layer

    class MyLIFNeuron(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = 0.0

        def forward(self, x):
            self.v = self.v + x
            spike = (self.v >= 1).float()
            self.v = self.v - spike
            return spike

    model = sj_mlp()
    model.append(layer.ElementWiseRecurrentContainer(MyLIFNeuron(), element_wise_function=lambda x, y: x + y))
    with pytest.warns(UserWarning, match=r"look like spiking neurons.*MyLIFNeuron"):
        learner = slr.wrap(model, rule="sltt")
    learner.unwrap()


def test_unknown_rule_lists_known():
    with pytest.raises(slr.WrapError, match="unknown rule 'bptt'.*sltt"):
        slr.wrap(sj_mlp(), rule="bptt")


def test_unknown_option_names_the_rule_its_options_and_a_likely_fix():
    model = sj_mlp()
    before = snapshot(model)
    with pytest.raises(slr.WrapError, match=r"rule 'sltt' has no option 'chunks' \(did you mean 'chunk'\?\)"):
        slr.wrap(model, rule="sltt", chunks=2)
    with pytest.raises(slr.WrapError, match="no option 'cuda_graphs'; it is an option of rule 'sltt'. Options of 'tp':"):
        slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), cuda_graphs=True)
    assert_same_snapshot(before, snapshot(model))

    class KeywordRule(slr.rules.Rule):  # a plugin's rule that takes any keyword is left to check its own
        name = "any_keyword"

        def __init__(self, model, neurons, **options):
            super().__init__(model, neurons)
            self.options = options

    registry = {"sltt": slr.rules.SLTT, "any_keyword": KeywordRule}
    from snn_localrules.wrap import _check_option_names

    _check_option_names("any_keyword", registry, {"whatever": 1})


def test_optimizer_checks():
    model = sj_mlp()
    other = nn.Linear(2, 2)
    with pytest.raises(slr.WrapError, match="none of the model's parameters"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(slr.WrapError, match="torch.optim.Optimizer"):
        slr.wrap(model, rule="sltt", optimizer=object())
    assert slr.learner_of(model) is None


@pytest.mark.parametrize("K", [0, -1, 1.5, True])
def test_bad_K(K):
    model = sj_mlp()
    with pytest.raises(slr.WrapError, match="K must be"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), K=K)


def test_K_needs_online_and_at_most_T():
    model = sj_mlp()
    with pytest.raises(slr.WrapError, match="K .*needs online mode"):
        slr.wrap(model, rule="sltt", K=2)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), K=5)
    with pytest.raises(slr.WrapError, match="K=5.*T=4"):
        learner.step(*_input("sj_single", T=4))
    learner.unwrap()


def test_online_refuses_model_that_owns_time_loop():
    model = TutorialNet()
    with pytest.raises(slr.WrapError, match="owns the time loop.*zero-change"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_online_refuses_a_forward_that_loops_over_time_before_any_update():
    torch.manual_seed(3)
    model = LoopsOverTime(snn_sequential())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 3, 12), torch.randint(0, 5, (3,))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(slr.WrapError, match=r"'net.1' \(snntorch.Leaky\), 'net.3' .*ran more than once.*"
                                            r"without the batch dimension.*multi_step=True.*zero-change"):
        learner.step(x, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # as the message says: fed [T, B, ...] sequences, the same forward trains as the plain Sequential does
    learner = slr.wrap(model := LoopsOverTime(snn_sequential()), rule="sltt", multi_step=True,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    model.load_state_dict(before)
    plain = snn_sequential()
    plain.load_state_dict({k[len("net."):]: v for k, v in before.items()})
    plain_learner = slr.wrap(plain, rule="sltt", optimizer=torch.optim.SGD(plain.parameters(), lr=0.5))
    assert learner.step(x, y).loss == plain_learner.step(x, y).loss
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _CountsOverTime(nn.Module):
    """The snnTorch tutorials' forward: loops over the first dimension itself and returns the spike count."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_seq):
        return sum(self.net(x)[0] for x in x_seq)


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_a_forward_that_loops_over_time_and_sums_is_named_as_such(rule):
    """Its output has no per-step form either; the learner names the loop over time, not the input layout."""
    torch.manual_seed(3)
    model = _CountsOverTime(snn_sequential())
    options = dict(num_classes=5) if rule == "tp" else {}
    learner = slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), **options)
    with pytest.raises(slr.WrapError, match=r"'net.1' \(snntorch.Leaky\), 'net.3' .*ran more than once.*"
                                            r"loops over time itself"):
        learner.step(torch.rand(4, 3, 12), torch.randint(0, 5, (3,)))
    learner.unwrap()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize(
    "x_shape, y_shape, match",
    [
        ((3, 12), (3,), "no time dimension"),  # [B, features] given as [T, B]
        ((3, 4, 12), (3,), "batch-first"),  # [B, T, ...]
        ((4, 2, 12), (3,), "batch size mismatch"),
        ((0, 3, 12), (3,), "no time step"),
    ],
)
def test_layout_errors(x_shape, y_shape, match):
    model = sj_mlp()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(slr.LayoutError, match=match):
        learner.step(torch.rand(*x_shape), torch.randint(0, 5, y_shape))
    learner.unwrap()


def test_label_errors_and_T_mismatch():
    model = sj_mlp()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), T=4)
    x = torch.rand(4, 3, 12)
    with pytest.raises(slr.LayoutError, match="class indices"):
        learner.step(x, torch.rand(3, 5))
    with pytest.raises(slr.LayoutError, match="T=6.*T=4"):
        learner.step(torch.rand(6, 3, 12), torch.randint(0, 5, (3,)))
    learner.unwrap()


def test_nan_loss_leaves_model_unchanged_and_clears_grads():
    model = sj_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_nan_at_step_2(o, y):
        calls.append(1)
        loss = F.cross_entropy(o, y)
        return loss * float("nan") if len(calls) == 3 else loss

    learner = slr.wrap(model, rule="sltt", optimizer=opt, loss=loss_nan_at_step_2)
    x, y = _input("sj_single")
    with pytest.raises(slr.NonFiniteLossError, match="time step 2"):
        learner.step(x, y)
    learner.unwrap()
    # a NaN input: spikes swallow it in forward, the surrogate returns it in backward
    learner = slr.wrap(model, rule="sltt", optimizer=opt)
    x[1, 0, 0] = float("nan")
    with pytest.raises(slr.NonFiniteLossError, match="non-finite gradients in 0.weight"):
        learner.step(x, y)
    assert all(p.grad is None for p in model.parameters())  # cleared, not restored: see SLTT.step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(len(s) == 0 for s in opt.state.values())
    learner.unwrap()


def test_failed_wrap_leaves_model_untouched():
    model = sj_mlp(step_mode="m")
    model[3].forward = lambda x: x  # someone else's per-instance forward on the second neuron
    before = snapshot(model)
    with pytest.raises(slr.WrapError, match="per-instance forward"):
        slr.wrap(model, rule="sltt")
    assert_same_snapshot(before, snapshot(model))  # the first neuron's hooks were taken off again
    assert slr.learner_of(model) is None


def test_reset_net_after_wrap_and_user_tensors_untouched():
    from spikingjelly.activation_based import functional

    model = sj_mlp(step_mode="s")
    learner = slr.wrap(model, rule="sltt")
    x, _ = _input("sj_single")
    x.requires_grad_(True)
    version = x._version
    for t in range(4):
        model(x[t])
    assert isinstance(model[1].v, torch.Tensor)
    functional.reset_net(model)
    assert model[1].v == 0.0 and model[3].v == 0.0
    assert x._version == version
    learner.unwrap()


def test_snntorch_explicit_state_not_modified_in_place():
    model = TutorialNet()
    learner = slr.wrap(model, rule="sltt")
    mem = torch.rand(3, 16, requires_grad=True) * 1.0
    version = mem._version
    spk, mem2 = model.lif1(torch.rand(3, 16), mem)
    assert mem._version == version and mem2 is not mem
    learner.unwrap()


def test_snntorch_reset_touches_only_the_model():
    import snntorch as snn

    outsider = snn.Leaky(beta=0.9, init_hidden=True)
    outsider(torch.ones(2, 3) * 0.5)
    state = outsider.mem.clone()
    model = snn_sequential("Leaky")
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    learner.step(*_input("snntorch_leaky"))
    assert torch.equal(outsider.mem, state)
    learner.unwrap()


def test_zero_change_gradient_differs_from_bptt():
    """The hooks really cut something: for LIF tau=2 SLTT is not BPTT."""
    x, y = _input("sj_multi", T=6)
    grads = []
    for wrap in (False, True):
        torch.manual_seed(1)
        model = sj_mlp(step_mode="m", tau=2.0)
        learner = slr.wrap(model, rule="sltt") if wrap else None
        out = model(x)
        sum(F.cross_entropy(out[t], y) for t in range(6)).backward()
        grads.append(model[0].weight.grad.clone())
        if learner:
            learner.unwrap()
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_deep_copy_of_a_wrapped_model_runs_its_own_weights_and_neurons(step_mode):
    # users snapshot models (best model, EMA) with copy.deepcopy while training: the copy carries the
    # rule's hooks and forwards along, and they must act on the copy, not on the original
    import copy

    import torch.nn.functional as F
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    model = nn.Sequential(layer.Linear(4, 6), neuron.LIFNode(), layer.Linear(6, 3), neuron.LIFNode(v_threshold=0.3))
    functional.set_step_mode(model, step_mode)
    fresh = copy.deepcopy(model)  # never wrapped until below: the truth
    slr.wrap(model, rule="sltt")
    snapshot_copy = copy.deepcopy(model)
    for net in (snapshot_copy, fresh):
        with torch.no_grad():
            net[2].weight.mul_(0.5)
            net[2].bias.fill_(1.0)  # the copy's weights now differ from the original's
    slr.wrap(fresh, rule="sltt")
    x = torch.rand(5, 2, 4) * 3
    y = torch.tensor([0, 2])

    def run(net):
        out = net(x) if step_mode == "m" else torch.stack([net(x_t) for x_t in x])
        loss = sum(F.cross_entropy(o, y) for o in out)
        loss.backward()
        functional.reset_net(net)
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    before = [dict(n._memories) for n in (model[1], model[3])]
    out, grads = run(snapshot_copy)
    assert [dict(n._memories) for n in (model[1], model[3])] == before  # the original's neurons untouched
    ref_out, ref_grads = run(fresh)
    assert torch.equal(out, ref_out) and out.sum() > 0
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    original_out, _ = run(model)
    assert not torch.equal(original_out, out)  # and the original still runs its own weights


@pytest.mark.parametrize("online", [False, True])
def test_unwrap_of_a_deep_copy_removes_what_the_copy_carried(online):
    """An EMA teacher or best-model snapshot made with copy.deepcopy of a wrapped model can be unwrapped on
    its own (before or after the original), which gives it back as a never-wrapped copy."""
    import copy
    import pickle

    from spikingjelly.activation_based import functional

    model = sj_conv("m")
    pristine = copy.deepcopy(model)
    before = snapshot(model)
    options = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) if online else {}
    learner = slr.wrap(model, rule="sltt", **options)
    teacher, best = copy.deepcopy(model), copy.deepcopy(model)
    assert slr.unwrap(teacher) is teacher  # while the original is wrapped
    assert_same_snapshot(before, snapshot(teacher))
    assert slr.learner_of(model) is learner and snapshot(model)["hooks"] != before["hooks"]
    with pytest.raises(slr.WrapError, match="part of a Sequential that is wrapped"):
        slr.unwrap(model[2])
    learner.unwrap()
    slr.unwrap(best)  # and after it
    for net in (teacher, best, model):
        assert_same_snapshot(before, snapshot(net))
        assert b"snn_localrules" not in pickle.dumps(net)  # nothing local left on it, nothing of ours to import
    x = (torch.rand(4, 2, 2, 8, 8) < 0.4).float()
    functional.reset_net(pristine)
    expected = pristine(x)
    functional.reset_net(teacher)
    assert torch.equal(teacher(x), expected)
    with pytest.raises(slr.WrapError, match="not wrapped"):
        slr.unwrap(teacher)


@pytest.mark.parametrize("make", [lambda: sj_conv("m"), lambda: sj_mlp("LIFNode", "s"), lambda: snn_sequential()])
def test_wrapping_a_deep_copy_that_carries_hooks_says_to_unwrap_it_first(make):
    import copy

    model = make()
    learner = slr.wrap(model, rule="sltt")
    twin = copy.deepcopy(model)
    hooks = [len(m._forward_pre_hooks) for m in twin.modules()]
    with pytest.raises(slr.WrapError, match=r"carries the hooks of a wrapped model.*slr.unwrap\(copy\) first"):
        slr.wrap(twin, rule="sltt")
    assert [len(m._forward_pre_hooks) for m in twin.modules()] == hooks  # no second set
    slr.unwrap(twin)
    slr.wrap(twin, rule="sltt").unwrap()
    learner.unwrap()


def test_torch_modules_are_never_taken_for_neurons():
    model = sj_mlp()
    model.append(nn.Threshold(0.1, 0.0))  # has a ``threshold`` attribute
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slr.wrap(model, rule="sltt").unwrap()
