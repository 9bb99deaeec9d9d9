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
        learner.unwrap()
        model(torch.rand(2, 12))
        assert learner.seen == 2
    finally:
        slr.unregister_plugin(name=name)
    assert "counting" not in slr.rules()
