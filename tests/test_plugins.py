"""The plugin layer: listing, entry points, a third-party neuron adapter and rule, hooks resolved once."""
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from models import ATanSpike
from snn_localrules.rules import Rule


class ThirdPartyNeuron(nn.Module):
    """A neuron of a framework snn-localrules has never heard of: state in ``u``, soft reset."""

    def __init__(self, decay=0.6):
        super().__init__()
        self.decay = decay
        self.u = 0.0

    def forward(self, x):
        u = self.decay * self.u + x
        spike = ATanSpike.apply(u - 1.0)
        self.u = u - spike
        return spike


class EvalHeavisideNeuron(ThirdPartyNeuron):
    """The same neuron, but in eval mode it spikes through a Heaviside without surrogate (no gradient), as
    SpikingJelly 0.0.0.0.14's IF and LIF neurons do."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        u = self.decay * self.u + x
        spike = (u >= 1.0).to(u)
        self.u = u - spike
        return spike


class ThirdPartyAdapter(slr.NeuronAdapter):
    framework = "thirdparty"
    state_names = ("u",)

    def reset_state(self):
        self.module.u = 0.0

    def passes_no_gradient(self):
        if isinstance(self.module, EvalHeavisideNeuron) and not self.module.training:
            return "in eval mode it spikes through a Heaviside; call model.train() before step()"
        return None


class ThirdPartyPlugin:
    def __init__(self):
        self.calls = 0

    @slr.hookimpl
    def slr_neuron_adapter(self, module):
        self.calls += 1
        return ThirdPartyAdapter(module) if isinstance(module, ThirdPartyNeuron) else None


@pytest.fixture
def plugin():
    plugin = ThirdPartyPlugin()
    name = slr.register_plugin(plugin, name="thirdparty-test")
    yield plugin
    slr.unregister_plugin(name=name)


def _net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 10), ThirdPartyNeuron(), nn.Linear(10, 3))


def _reference_grads(net, x, y):
    """Per-step loop with the neuron state detached at the start of every step (plain autograd)."""
    net.zero_grad()
    neuron = net[1]
    u = torch.zeros(())
    T = x.shape[0]
    for t in range(T):
        u = (neuron.decay * u.detach() + net[0](x[t]))
        spike = ATanSpike.apply(u - 1.0)
        u = u - spike
        (F.cross_entropy(net[2](spike), y) / T).backward()
    return [p.grad.clone() for p in net.parameters()]


def test_listing():
    pytest.importorskip("spikingjelly.activation_based.neuron")
    pytest.importorskip("snntorch")
    assert "sltt" in slr.rules()
    names = {(n.framework, n.name) for n in slr.neurons()}
    for expected in [("spikingjelly", "LIFNode"), ("spikingjelly", "IFNode"), ("spikingjelly", "ParametricLIFNode"),
                     ("snntorch", "Leaky"), ("snntorch", "Synaptic"), ("snntorch", "RLeaky")]:
        assert expected in names


def test_adapters_are_entry_point_plugins():
    found = entry_points()  # Python 3.9's is a dict of groups, without select()
    group = found.select(group="snn_localrules") if hasattr(found, "select") else found.get("snn_localrules", [])
    eps = {ep.name: ep.value for ep in group}
    assert eps.get("spikingjelly") == "snn_localrules.adapters.spikingjelly"
    assert eps.get("snntorch") == "snn_localrules.adapters.snntorch"
    names = dict(slr.plugin_manager().list_name_plugin())
    assert names["spikingjelly"].__name__ == "snn_localrules.adapters.spikingjelly"


def test_third_party_adapter_trains(plugin):
    net = _net()
    x = torch.rand(5, 8, 6) * 1.5
    y = torch.randint(0, 3, (8,))
    ref = _reference_grads(_net(), x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    learner = slr.wrap(net, rule="sltt", optimizer=opt)
    assert [n.framework for n in learner.neurons] == ["thirdparty"]
    learner.step(x, y)
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    learner.unwrap()
    # and it learns: a few dozen online steps on a fixed batch lower the loss
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    learner = slr.wrap(net, rule="sltt", optimizer=opt)
    losses = [learner.step(x, y).loss for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    learner.unwrap()


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_a_step_through_a_neuron_that_passes_no_gradient_is_refused(plugin, rule):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 10), EvalHeavisideNeuron(), nn.Linear(10, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    learner = slr.wrap(net, rule=rule, optimizer=optimizer, **({"num_classes": 3} if rule == "tp" else {}))
    x, y = torch.rand(5, 8, 6) * 1.5, torch.randint(0, 3, (8,))
    net.eval()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(slr.WrapError, match=r"'1' \(thirdparty\.EvalHeavisideNeuron\) passes no gradient to its input "
                                            r"now.*Heaviside; call model\.train\(\) before step\(\)"):
        learner.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert optimizer.state_dict()["state"] == {} and net[1].u == 0.0 and all(p.grad is None for p in net.parameters())
    net.train()  # as the message says: then the layer below the neuron learns
    learner.step(x, y)
    assert not torch.equal(before[0], net[0].weight)
    learner.unwrap()


def test_hooks_resolved_once_at_wrap(plugin):
    net = _net()
    learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    asked = plugin.calls
    assert asked == len(list(net.modules()))
    learner.step(torch.rand(6, 4, 6), torch.randint(0, 3, (4,)))
    assert plugin.calls == asked
    learner.unwrap()


def test_third_party_rule():
    class CountingRule(Rule):
        name = "counting"

        def __init__(self, model, neurons):
            super().__init__(model, neurons)
            self.optimizer = None  # a rule of its own may keep what it likes there (the core's rules check theirs)

        def install(self, hooks):
            self.seen = 0

            def hook(module, args):
                self.seen += 1

            for neuron in self.neurons:
                hooks.pre_hook(neuron.module, hook)

    class RulePlugin:
        @slr.hookimpl
        def slr_rules(self):
            return {"counting": CountingRule}

    pytest.importorskip("spikingjelly.activation_based.neuron")
    from models import sj_mlp

    name = slr.register_plugin(RulePlugin(), name="rule-test")
    try:
        assert "counting" in slr.rules()
        model = sj_mlp()
        learner = slr.wrap(model, rule="counting")
        model(torch.rand(2, 12))
        assert learner.seen == 2
        learner.optimizer = "anything"
        learner.unwrap()
        model(torch.rand(2, 12))
        assert learner.seen == 2
    finally:
        slr.unregister_plugin(name=name)
    assert "counting" not in slr.rules()


# -- what a plugin author meets ------------------------------------------------------------------------


class GradedMultiStepNeuron(nn.Module):
    """A third-party neuron that takes ``[T, B, ...]`` per call in multi-step mode and emits graded spikes
    (amplitude ``amp``); state in ``u``."""

    def __init__(self, decay=0.6, amp=0.5):
        super().__init__()
        self.decay, self.amp, self.step_mode, self.u = decay, amp, "m", 0.0

    def one_step(self, x):
        u = self.decay * self.u + x
        spike = ATanSpike.apply(u - 1.0)
        self.u = u - spike
        return self.amp * spike

    def forward(self, x):
        if self.step_mode == "s":
            return self.one_step(x)
        return torch.stack([self.one_step(x_t) for x_t in x])


class MultiStepAdapter(ThirdPartyAdapter):
    """The multi-step overrides the README's "Writing a plugin" shows."""

    supports_multi_step = True

    @property
    def multi_step(self):
        return self.module.step_mode == "m"

    def single_step(self, x):
        return self.module.one_step(x)


class FusedGradedAdapter(MultiStepAdapter):
    """Declares a fused form (here the stepped loop itself), leaving ``fused_outputs_binary`` False."""

    def fused_sltt_multi_step(self, x_seq):
        return self.run_steps(x_seq, self.detach_state)


def _multistep_plugin(adapter_cls):
    class Plugin:
        @slr.hookimpl
        def slr_neuron_adapter(self, module):
            return adapter_cls(module) if isinstance(module, GradedMultiStepNeuron) else None

    return Plugin()


def _multistep_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 10), GradedMultiStepNeuron(), nn.Linear(10, 3))


def _multistep_reference(net, x, y):
    """Plain autograd: one step at a time, the state detached before each step, per-step losses / T."""
    net.zero_grad()
    neuron, u, T = net[1], torch.zeros(()), x.shape[0]
    for t in range(T):
        u = neuron.decay * u.detach() + net[0](x[t])
        spike = ATanSpike.apply(u - 1.0)
        u = u - spike
        (F.cross_entropy(net[2](neuron.amp * spike), y) / T).backward()
    return [p.grad.clone() for p in net.parameters()]


def _zero_change_grads(net, x, y):
    net.zero_grad()
    net[1].u = 0.0
    out = net(x)  # the user's multi-step loop: one call over [T, B, ...]
    sum(F.cross_entropy(o, y) for o in out).div(x.shape[0]).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("adapter_cls", [MultiStepAdapter, FusedGradedAdapter])
def test_a_multi_step_neuron_adapted_as_the_readme_shows_gets_sltt_gradients(adapter_cls):
    x, y = torch.rand(5, 8, 6) * 1.5, torch.randint(0, 3, (8,))
    ref = _multistep_reference(_multistep_net(), x, y)
    name = slr.register_plugin(_multistep_plugin(adapter_cls), name="multistep-test")
    try:
        net = _multistep_net()
        learner = slr.wrap(net, rule="sltt")  # zero-change; FusedGradedAdapter: fused with graded output
        for g, r in zip(_zero_change_grads(net, x, y), ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        learner.unwrap()
        net = _multistep_net()
        learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.0), chunk=2)
        learner.step(x, y)
        for p, r in zip(net.parameters(), ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
        learner.unwrap()
    finally:
        slr.unregister_plugin(name=name)


def test_bundled_adapters_are_asked_after_every_entry_point_plugin(tmp_path, monkeypatch):
    """An entry-point plugin found before snn-localrules' own distribution (an earlier site directory)
    still answers first for a SpikingJelly class."""
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    (tmp_path / "slr_takeover.py").write_text(
        "import snn_localrules as slr\n"
        "class TakeOver(slr.NeuronAdapter):\n"
        "    framework = 'takeover'\n"
        "@slr.hookimpl\n"
        "def slr_neuron_adapter(module):\n"
        "    return TakeOver(module) if type(module).__name__ == 'LIFNode' else None\n"
    )
    info = tmp_path / "slr_takeover-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slr-takeover\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[snn_localrules]\ntakeover = slr_takeover\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from snn_localrules.plugins import _build_manager

    pm = _build_manager()
    assert pm.get_plugin("takeover") is not None
    assert pm.hook.slr_neuron_adapter(module=neuron.LIFNode()).framework == "takeover"


def test_a_plugin_with_a_misspelled_hook_is_not_left_registered():
    class Typo:
        @slr.hookimpl
        def slr_neuron_adaptor(self, module):
            return None

    with pytest.raises(Exception, match="slr_neuron_adaptor"):
        slr.register_plugin(Typo(), name="typo-test")
    assert slr.plugin_manager().get_plugin("typo-test") is None
    name = slr.register_plugin(ThirdPartyPlugin(), name="typo-test")  # the fixed plugin, same name
    slr.unregister_plugin(name=name)


class ChildStateNeuron(nn.Module):
    """Keeps its membrane in a child module."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Module()
        self.cell.v = 0.0

    def forward(self, x):
        v = 0.6 * self.cell.v + x
        spike = ATanSpike.apply(v - 1.0)
        self.cell.v = v - spike
        return spike


class ChildStateAdapter(slr.NeuronAdapter):
    framework = "thirdparty"

    def __init__(self, module):
        super().__init__(module)
        self.cell = module.cell  # derived from the module once, as adapters may

    def get_state(self):
        return {"v": self.cell.v}

    def set_state(self, state):
        self.cell.v = state["v"]

    def reset_state(self):
        self.cell.v = 0.0


class TupleStateNeuron(nn.Module):
    """norse-style: the carried state is one tuple ``(i, v)``."""

    def __init__(self):
        super().__init__()
        self.state = None

    def forward(self, x):
        i, v = self.state if self.state is not None else (torch.zeros_like(x), torch.zeros_like(x))
        i = 0.7 * i + x
        v = 0.6 * v + i
        spike = ATanSpike.apply(v - 1.0)
        self.state = (i, v - spike)
        return spike


class TupleStateAdapter(slr.NeuronAdapter):
    framework = "thirdparty"
    state_names = ("state",)

    def reset_state(self):
        self.module.state = None


def _state_plugin():
    class Plugin:
        @slr.hookimpl
        def slr_neuron_adapter(self, module):
            if isinstance(module, ChildStateNeuron):
                return ChildStateAdapter(module)
            if isinstance(module, TupleStateNeuron):
                return TupleStateAdapter(module)
            return None

    return Plugin()


def _loop_grads(net, x, y, cut=None):
    """The user's loop: forward over T, one backward; ``cut(neuron)`` detaches its state by hand."""
    net.zero_grad()
    for t in range(x.shape[0]):
        if cut is not None and t > 0:
            cut(net[1])
        loss = F.cross_entropy(net(x[t]), y) / x.shape[0]
        loss.backward(retain_graph=True) if t < x.shape[0] - 1 else loss.backward()
    return [p.grad.clone() for p in net.parameters()]


def _reset(net):
    if isinstance(net[1], ChildStateNeuron):
        net[1].cell.v = 0.0
    else:
        net[1].state = None


@pytest.mark.parametrize("neuron_cls", [ChildStateNeuron, TupleStateNeuron])
def test_third_party_state_kinds_are_cut_on_the_model_and_on_its_deep_copy(neuron_cls):
    import copy

    def cut(n):
        if isinstance(n, ChildStateNeuron):
            n.cell.v = n.cell.v.detach()
        else:
            n.state = tuple(s.detach() for s in n.state)

    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(6, 10), neuron_cls(), nn.Linear(10, 3))
    x, y = torch.rand(5, 8, 6) * 1.5, torch.randint(0, 3, (8,))
    reference = copy.deepcopy(net)
    ref = _loop_grads(reference, x, y, cut)
    _reset(reference)
    bptt = _loop_grads(reference, x, y)
    assert max((a - b).abs().max() for a, b in zip(ref, bptt)) > 1e-3  # the cut matters here
    name = slr.register_plugin(_state_plugin(), name="state-test")
    try:
        learner = slr.wrap(net, rule="sltt")
        teacher = copy.deepcopy(net)  # an EMA copy carries the hooks: they act on its own neuron
        for model in (net, teacher):
            _reset(model)
            for g, r in zip(_loop_grads(model, x, y), ref):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        learner.unwrap()
        slr.unwrap(teacher)
        _reset(net)
        learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.0))
        learner.step(x, y)  # online: the state is cut before every step, no "backward twice"
        for p, r in zip(net.parameters(), ref):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
        learner.unwrap()
    finally:
        slr.unregister_plugin(name=name)


def test_a_state_the_core_cannot_cut_is_named():
    class Holder:
        def __init__(self, v):
            self.v = v

    class HolderAdapter(ThirdPartyAdapter):
        def get_state(self):
            return {"u": Holder(self.module.u)}

    class Plugin:
        @slr.hookimpl
        def slr_neuron_adapter(self, module):
            return HolderAdapter(module) if isinstance(module, ThirdPartyNeuron) else None

    name = slr.register_plugin(Plugin(), name="holder-test")
    try:
        net = _net()
        learner = slr.wrap(net, rule="sltt")
        with pytest.raises(slr.PluginError, match=r"'u' of thirdparty\.ThirdPartyNeuron is a Holder.*override "
                                                  r"detach_state"):
            net(torch.rand(4, 6))
        learner.unwrap()
    finally:
        slr.unregister_plugin(name=name)


def test_plugin_mistakes_are_named_and_leave_the_model_as_it_was():
    import snn_localrules.functional.losses as losses

    class ReturnsClass:
        @slr.hookimpl
        def slr_neuron_adapter(self, module):
            return ThirdPartyAdapter if isinstance(module, ThirdPartyNeuron) else None

    class Raises:
        @slr.hookimpl
        def slr_neuron_adapter(self, module):
            if isinstance(module, ThirdPartyNeuron):
                raise KeyError("no such dtype")
            return None

    class LossReturnsFunction(ThirdPartyPlugin):
        @slr.hookimpl
        def slr_step_loss(self, loss):
            return (lambda o, y: F.cross_entropy(o, y)) if loss is F.cross_entropy else None

    class CarriedWithoutModule(ThirdPartyPlugin):
        @slr.hookimpl
        def slr_carried_state(self, model, neurons):
            class State:
                def get_state(self):
                    return {}

                def set_state(self, state):
                    pass

            return [State()]

    cases = [
        (ReturnsClass(), {}, r"slr_neuron_adapter answered <class .*ThirdPartyAdapter'> for module '1' "
                             r"\(test_plugins\.ThirdPartyNeuron\); it must return an instance"),
        (Raises(), {}, r"slr_neuron_adapter failed on module '1' \(test_plugins\.ThirdPartyNeuron\): KeyError"),
        (LossReturnsFunction(), {"loss": F.cross_entropy}, r"slr_step_loss answered function.*must return a "
                                                           r"snn_localrules\.functional\.losses\.StepLoss"),
        (CarriedWithoutModule(), {}, r"slr_carried_state answered a State without a 'module' attribute"),
    ]
    assert losses.StepLoss  # the class the message names
    for plugin, options, message in cases:
        name = slr.register_plugin(plugin, name="mistake-test")
        try:
            net = _net()
            before = {k: v.clone() for k, v in net.state_dict().items()}
            with pytest.raises(slr.PluginError, match=message):
                slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.1), **options)
            assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
            assert not net[1]._forward_pre_hooks and "forward" not in vars(net[1])
            assert slr.learner_of(net) is None if hasattr(slr, "learner_of") else True
        finally:
            slr.unregister_plugin(name=name)


def test_a_rule_subclass_registered_under_its_own_name_is_that_rule(tmp_path):
    from snn_localrules.rules import SLTT

    class CustomSLTT(SLTT):
        pass

    class RulePlugin(ThirdPartyPlugin):
        @slr.hookimpl
        def slr_rules(self):
            return {"sltt_custom": CustomSLTT}

    name = slr.register_plugin(RulePlugin(), name="custom-rule-test")
    try:
        net = _net()
        learner = slr.wrap(net, rule="sltt_custom", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        assert learner.name == "sltt_custom"
        with pytest.raises(slr.WrapError, match="already wrapped by rule 'sltt_custom'"):
            slr.wrap(net, rule="sltt")
        learner.save(tmp_path / "ckpt.pt")
        learner.unwrap()
        plain = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        with pytest.raises(ValueError, match="'sltt_custom'"):
            plain.load(tmp_path / "ckpt.pt")
        plain.unwrap()
        # a checkpoint such a learner wrote when learners named themselves by their class's name still loads
        old = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        old["learner"]["rule"] = "sltt"
        torch.save(old, tmp_path / "old.pt")
        learner = slr.wrap(net, rule="sltt_custom", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        learner.load(tmp_path / "old.pt")
        learner.unwrap()
    finally:
        slr.unregister_plugin(name=name)


def test_a_bad_carried_state_answer_for_a_module_put_in_after_wrapping_is_a_plugin_error():
    """A holder without .module, answered for a layer put into a wrapped model, failed on the user's own line
    in a bare AttributeError (at wrap time the same answer is a PluginError)."""
    class Accumulator(nn.Module):
        def forward(self, x):
            return x

    class CarriedWithoutModule(ThirdPartyPlugin):
        @slr.hookimpl
        def slr_carried_state(self, model, neurons):
            return [object()] if any(isinstance(m, Accumulator) for m in model.modules()) else []

    name = slr.register_plugin(CarriedWithoutModule(), name="late-mistake-test")
    try:
        net = _net()
        learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        with pytest.raises(slr.PluginError, match="slr_carried_state answered a object without a 'module'"):
            net.append(Accumulator())
        learner.unwrap()
    finally:
        slr.unregister_plugin(name=name)
