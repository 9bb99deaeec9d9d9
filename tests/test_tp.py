"""Traces Propagation: the layer loss against an independent implementation, a full TP step against a
hand-written reference, locality, the label path, checkpoints, wrap/unwrap and learning."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from conftest import assert_same_snapshot, snapshot
from models import ATanSpike
from snn_localrules.functional.traces import (
    contrastive_trace_loss,
    distance_soft_targets,
    label_soft_targets,
    update_trace,
)

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402


def _loop_loss(data, label, targets):
    """Soft cross-entropy written with explicit loops, as the paper states it."""
    B = data.shape[0]
    total = 0.0
    for i in range(B):
        logits = [sum(data[i, k] * label[j, k] for k in range(data.shape[1])) for j in range(B)]
        m = max(float(z.detach()) for z in logits)
        log_norm = m + torch.log(sum(torch.exp(z - m) for z in logits))
        total = total - sum(targets[i, j] * (logits[j] - log_norm) for j in range(B))
    return total / B


def test_contrastive_loss_and_gradient_match_loop_implementation():
    torch.manual_seed(0)
    data = torch.rand(5, 7, dtype=torch.float64, requires_grad=True)
    label = torch.rand(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1])
    for targets in (label_soft_targets(y).double(), distance_soft_targets(torch.rand(5, 3)).double()):
        ours = contrastive_trace_loss(data, label, targets)
        ref = _loop_loss(data, label, targets)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
        g_ours = torch.autograd.grad(ours, (data, label))
        g_ref = torch.autograd.grad(ref, (data, label))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # Eq. 18 form: dL/dz = (softmax(z) - yhat) / B
        z = (data @ label.t()).detach().requires_grad_(True)
        loss = -(targets * F.log_softmax(z, 1)).sum(1).mean()
        (gz,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(gz, (torch.softmax(z, 1) - targets) / 5)


def test_soft_targets():
    y = torch.tensor([3, 1, 3, 3])
    t = label_soft_targets(y)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t[0, 2] == pytest.approx(1 / 3) and t[0, 1] == 0 and t[1, 1] == 1
    traces = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = distance_soft_targets(traces)
    assert d[0, 2] == d[0, 0] > d[0, 1]
    assert d[0, 1] == pytest.approx(math.exp(-math.sqrt(2)) / (2 + math.exp(-math.sqrt(2))))


def test_trace_update_is_local_in_time():
    prev = torch.ones(3, requires_grad=True)
    s = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    eps = update_trace(prev, s, 0.5)
    torch.testing.assert_close(eps, torch.tensor([0.5, 1.5, 1.5]))
    eps.sum().backward()
    assert prev.grad is None and torch.equal(s.grad, torch.ones(3))


def _mlp(hidden=(16,), seed=0, step_mode="s"):
    torch.manual_seed(seed)
    mods, n_in = [], 12
    for h in hidden:
        mods += [layer.Linear(n_in, h), neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None,
                                                       surrogate_function=surrogate.ATan())]
        n_in = h
    mods.append(layer.Linear(n_in, 4))
    model = nn.Sequential(*mods)
    functional.set_step_mode(model, step_mode)
    return model


def _one_tp_batch(model, steps):
    """One TP batch of 6 samples, 4 classes, trace decay 0.7, lr 0: returns the batch and the label
    projection; the model's .grad hold the last step's gradients."""
    x = torch.rand(steps, 6, 12) * 3
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                       num_classes=4, trace_decay=0.7, seed=5)
    learner.step(x, y)
    learner.unwrap()
    return x, y, learner.projection


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_tp_step_matches_hand_written_reference(step_mode):
    """T=2, lr=0: after step() the .grad hold the gradient of the last step's TP loss. Recompute it
    by hand: LIF (decay_input=False, soft reset, ATan) equations, traces, label path, both losses."""
    model = _mlp(step_mode=step_mode)
    x, y, S = _one_tp_batch(model, steps=2)

    W1, b1, W2, b2 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    lam = 1 - 1 / 2.0
    v = torch.zeros(12, 16)
    trace = None
    for t in range(2):
        inp = torch.cat([x[t], S[y]])
        h = lam * v.detach() + inp @ W1.t() + b1
        s = ATanSpike.apply(h - 1.0)
        v = h - s
        trace = s if trace is None else 0.7 * trace.detach() + s
    loss_layer = contrastive_trace_loss(trace[:6], trace[6:], label_soft_targets(y))
    out = trace.detach() @ W2.t() + b2
    loss_readout = F.cross_entropy(out[:6], y)
    (loss_layer + loss_readout).backward()
    for p, ref in zip(model.parameters(), (W1, b1, W2, b2)):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert W1.grad.abs().sum() > 0


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_tp_step_through_a_recurrent_container_feeds_back_spikes(step_mode):
    """The last hidden layer inside SpikingJelly's LinearRecurrentContainer: the readout gets its trace,
    and the container feeds back its spikes s[t-1] (it kept the trace before, which then also charged the
    next step). Hand-written reference, T=3, lr=0: the last step's gradients, the recurrent block's too."""
    torch.manual_seed(0)
    lif = neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None, surrogate_function=surrogate.ATan())
    model = nn.Sequential(
        layer.Linear(12, 16, step_mode=step_mode),
        layer.LinearRecurrentContainer(lif, 16, 16, bias=False, step_mode=step_mode),
        layer.Linear(16, 4, step_mode=step_mode),
    )
    x, y, S = _one_tp_batch(model, steps=3)

    W1, b1, R, W2, b2 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    lam = 1 - 1 / 2.0
    v, fed_back, trace = torch.zeros(12, 16), torch.zeros(12, 16), None
    for t in range(3):
        h = lam * v.detach() + torch.cat([torch.cat([x[t], S[y]]) @ W1.t() + b1, fed_back], 1) @ R.t()
        s = ATanSpike.apply(h - 1.0)
        v, fed_back = h - s, s.detach()
        trace = s if trace is None else 0.7 * trace.detach() + s
    assert 0 < fed_back.mean() < 1  # spikes were fed back
    loss_layer = contrastive_trace_loss(trace[:6], trace[6:], label_soft_targets(y))
    out = trace.detach() @ W2.t() + b2
    (loss_layer + F.cross_entropy(out[:6], y)).backward()
    for p, ref in zip(model.parameters(), (W1, b1, R, W2, b2)):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert R.grad[:, 16:].abs().sum() > 0


def test_tp_recurrent_container_with_a_layer_after_the_neuron():
    """Inside LinearRecurrentContainer(Sequential(LIF, Linear)) the neuron is not the container's output:
    its trace goes on through the inner Linear (trained), which the readout then gets."""
    torch.manual_seed(0)
    inner = layer.Linear(5, 5)
    model = nn.Sequential(layer.Linear(6, 5),
                          layer.LinearRecurrentContainer(nn.Sequential(neuron.LIFNode(v_threshold=0.5), inner), 5, 5),
                          layer.Linear(5, 3))
    seen = {}
    inner.register_forward_hook(lambda m, a, o: seen.__setitem__("inner", (a[0].detach(), o.detach())))
    model[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("readout_in", a[0].detach()))
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), num_classes=3)
    learner.step(torch.rand(5, 4, 6) * 3, torch.tensor([0, 1, 2, 0]))
    inner_in, inner_out = seen["inner"]
    assert torch.equal(seen["readout_in"], inner_out)
    assert not torch.equal(inner_in, inner_in.round())  # the inner Linear gets the trace
    assert inner.weight.grad is not None and inner.weight.grad.abs().sum() > 0
    learner.unwrap()


class _Block(nn.Module):
    def __init__(self, lin, lif, dropout=False):
        super().__init__()
        self.lin, self.lif = lin, lif
        self.drop = nn.Dropout(0.0) if dropout else None

    def forward(self, x):
        s = self.lif(self.lin(x))
        return self.drop(s) if self.drop is not None else s


@pytest.mark.parametrize("dropout", [False, True])
def test_tp_recurrent_container_around_a_users_block_ending_with_the_neuron(dropout):
    """The container's sub_module a user's block (and a dropout after the neuron): the same as the layers
    in an nn.Sequential (the block had not been recognised: the trace was fed back, gradients 0.96 off)."""
    grads = []
    for block in (lambda lin, lif: nn.Sequential(lin, lif), lambda lin, lif: _Block(lin, lif, dropout)):
        torch.manual_seed(0)
        lin, lif = nn.Linear(8, 8), neuron.LIFNode(v_threshold=0.3)
        model = nn.Sequential(layer.Linear(6, 8), layer.LinearRecurrentContainer(block(lin, lif), 8, 8),
                              layer.Linear(8, 3))
        torch.manual_seed(1)
        x, y = torch.rand(6, 5, 6) * 3, torch.tensor([0, 1, 2, 0, 1])
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                           num_classes=3, seed=0)
        learner.step(x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
        learner.unwrap()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _NeuronRegisteredLast(nn.Module):
    """Registered (Linear, LIF), run LIF then Linear: registration order says the neuron ends the block."""

    def __init__(self):
        super().__init__()
        self.lin, self.lif = nn.Linear(8, 8), neuron.LIFNode(v_threshold=0.3)

    def forward(self, x):
        return self.lin(self.lif(x))


class _NeuronRegisteredFirst(nn.Module):
    """Registered (LIF, Linear), run Linear then LIF: the neuron's output is the block's."""

    def __init__(self, lin, lif):
        super().__init__()
        self.lif, self.lin = lif, lin

    def forward(self, x):
        return self.lif(self.lin(x))


def test_tp_recurrent_container_pairing_follows_the_forward_not_the_registration():
    grads = []  # the neuron last in the forward, whatever order the block registered its modules in
    for block in (lambda lin, lif: nn.Sequential(lin, lif), lambda lin, lif: _NeuronRegisteredFirst(lin, lif)):
        torch.manual_seed(0)
        lin, lif = nn.Linear(8, 8), neuron.LIFNode(v_threshold=0.3)
        model = nn.Sequential(layer.Linear(6, 8), layer.LinearRecurrentContainer(block(lin, lif), 8, 8),
                              layer.Linear(8, 3))
        torch.manual_seed(1)
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                           num_classes=3, seed=0)
        learner.step(torch.rand(6, 5, 6) * 3, torch.tensor([0, 1, 2, 0, 1]))
        grads.append([p.grad.clone() for p in model.parameters()])
        learner.unwrap()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)  # and a Linear after the neuron in the forward, registered before it
    model = nn.Sequential(layer.Linear(6, 8), layer.LinearRecurrentContainer(_NeuronRegisteredLast(), 8, 8),
                          layer.Linear(8, 3))
    inner = model[1].sub_module.lin
    seen = {}
    inner.register_forward_hook(lambda m, a, o: seen.__setitem__("inner", o.detach()))
    model[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("readout_in", a[0].detach()))
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), num_classes=3)
    learner.step(torch.rand(5, 4, 6) * 3, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(seen["readout_in"], seen["inner"])  # the Linear after the neuron is not skipped
    assert inner.weight.grad is not None and inner.weight.grad.abs().sum() > 0
    learner.unwrap()


def test_locality_layer_update_independent_of_layers_above():
    """Changing layer 2's weights does not change layer 1's update on the same batch."""
    x = torch.rand(4, 8, 12) * 3
    y = torch.randint(0, 4, (8,))
    updates = []
    for scale in (1.0, 3.0):
        model = _mlp(hidden=(16, 16), seed=1)
        with torch.no_grad():
            model[2].weight.mul_(scale)
        before = model[0].weight.detach().clone()
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                           num_classes=4, seed=0)
        learner.step(x, y)
        learner.unwrap()
        updates.append((model[0].weight.detach() - before, model[2].weight.detach().clone()))
    assert updates[0][0].abs().sum() > 0
    torch.testing.assert_close(updates[0][0], updates[1][0], rtol=0, atol=0)


def test_label_path_deterministic_and_state_dict_round_trip():
    x = torch.rand(3, 8, 12) * 3
    y = torch.randint(0, 4, (8,))
    a, b = _mlp(seed=2), _mlp(seed=2)
    la = slr.wrap(a, rule="tp", optimizer=torch.optim.SGD(a.parameters(), lr=0.1), num_classes=4, seed=7)
    lb = slr.wrap(b, rule="tp", optimizer=torch.optim.SGD(b.parameters(), lr=0.1), num_classes=4, seed=7)
    la.step(x, y)
    lb.step(x, y)
    assert torch.equal(la.projection, lb.projection)
    # checkpoint a, restore into a fresh learner c: their next updates are identical
    c = _mlp(seed=3)
    c.load_state_dict(a.state_dict())
    opt_c = torch.optim.SGD(c.parameters(), lr=0.1)
    lc = slr.wrap(c, rule="tp", optimizer=opt_c, num_classes=4, seed=99)
    lc.load_state_dict(copy.deepcopy(la.state_dict()))
    assert torch.equal(lc.projection, la.projection)
    x2 = torch.rand(3, 8, 12) * 3
    la.step(x2, y)
    lc.step(x2, y)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    other = _mlp(seed=2)
    lo = slr.wrap(other, rule="tp", optimizer=torch.optim.SGD(other.parameters(), lr=0.1), num_classes=4, seed=8)
    lo.step(x, y)
    assert not torch.equal(lo.projection, la.projection)
    for learner in (la, lb, lc, lo):
        learner.unwrap()


def test_tp_wrap_unwrap_and_errors():
    model = _mlp(step_mode="m")
    before = snapshot(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=4)
    learner.step(torch.rand(3, 5, 12) * 3, torch.randint(0, 4, (5,)))
    assert learner.predict(torch.rand(3, 5, 12) * 3).shape == (5,)  # multi-step model, T=3 in one call
    before["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(slr.WrapError, match="already wrapped"):
        slr.wrap(model, rule="tp", optimizer=opt, num_classes=4)
    slr.unwrap(model)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(slr.WrapError, match="needs optimizer"):
        slr.wrap(model, rule="tp", num_classes=4)
    with pytest.raises(slr.WrapError, match="num_classes"):
        slr.wrap(model, rule="tp", optimizer=opt)
    learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=4)
    with pytest.raises(slr.LayoutError, match="batch-first"):
        learner.step(torch.rand(5, 3, 12), torch.randint(0, 4, (5,)))
    with pytest.raises(slr.LossError, match="labels must be in"):
        learner.step(torch.rand(3, 5, 12), torch.tensor([0, 1, 2, 3, 4]))
    learner.unwrap()
    assert slr.learner_of(model) is None


def test_silent_layer_is_reported():
    model = _mlp()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    with pytest.warns(RuntimeWarning, match="never spiked") as caught:
        stats = learner.step(torch.zeros(3, 4, 12), torch.tensor([0, 1, 2, 3]))
    assert stats.silent_layers == [0]
    assert caught[0].filename == __file__  # the warning points at the caller's step()
    learner.unwrap()


def test_tp_learns_a_fixed_batch():
    torch.manual_seed(4)
    centers = torch.rand(4, 12) * 3
    y = torch.arange(4).repeat(4)
    x = (centers[y] + 0.1 * torch.randn(16, 12)).unsqueeze(0).repeat(6, 1, 1)
    model = _mlp(hidden=(32,), seed=4)
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), num_classes=4)
    first = learner.step(x, y).loss
    for _ in range(20):
        stats = learner.step(x, y)
    assert stats.loss < first
    assert (learner.predict(x) == y).float().mean() >= 0.9
    learner.unwrap()


def test_tp_on_snntorch_spike_output_model():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), snn.Leaky(beta=0.7, init_hidden=True),
                          nn.Linear(32, 4), snn.Leaky(beta=0.7, init_hidden=True, output=True))
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), num_classes=4)
    assert learner.neuron_output
    x = torch.rand(5, 8, 12) * 3
    y = torch.randint(0, 4, (8,))
    stats = learner.step(x, y)
    assert len(stats.layer_losses) == 1 and stats.readout_loss > 0
    assert learner.predict(x).shape == (8,)
    learner.unwrap()


def _spike_output_mlp(seed, v_threshold):
    """12-32-4 with a LIF after each linear: the model ends with a neuron (spike-count output)."""
    torch.manual_seed(seed)
    return nn.Sequential(layer.Linear(12, 32), neuron.LIFNode(tau=2.0), layer.Linear(32, 4),
                         neuron.LIFNode(tau=2.0, v_threshold=v_threshold))


def test_tp_on_spikingjelly_spike_output_model():
    # a SpikingJelly neuron holds its surrogate as a child module: the model still ends with the neuron
    model = _spike_output_mlp(seed=0, v_threshold=0.5)
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), num_classes=4)
    assert learner.neuron_output
    x = torch.rand(5, 8, 12) * 3
    y = torch.randint(0, 4, (8,))
    readout_before = model[2].weight.detach().clone()
    stats = learner.step(x, y)
    assert len(stats.layer_losses) == 1 and stats.readout_loss > 0
    assert not torch.equal(model[2].weight, readout_before)  # the spiking readout is trained by its CE
    spikes = []
    handle = model[3].register_forward_hook(lambda m, i, o: spikes.append(o))
    prediction = learner.predict(x)
    handle.remove()
    assert len(spikes) == 5
    assert torch.equal(prediction, torch.stack(spikes).sum(0).argmax(-1))  # argmax of the spike counts
    learner.unwrap()


def test_label_projection_is_scaled_to_the_whole_first_batch():
    """A blank first frame (an event stream's onset) must not make S all zeros; an all-zero first batch
    leaves S to the next batch."""
    model = _mlp()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.warns(RuntimeWarning, match="never spiked"):
        learner.step(torch.zeros(3, 4, 12), y)
    assert learner.projection is None
    x = torch.rand(4, 4, 12) * 2
    x[0] = 0.0
    learner.step(x, y)
    # S is drawn with mean 1 before scaling, so its mean is the batch's mean magnitude times label_scale
    assert learner.projection.mean().item() == pytest.approx(x.abs().mean().item() * learner.label_scale, rel=1e-5)
    learner.unwrap()


class _ReadoutRegisteredFirst(nn.Module):
    """The readout is defined first in __init__ but runs last: forward order decides, not registration."""

    def __init__(self, readout_weights=True):
        super().__init__()
        torch.manual_seed(9)
        self.out = layer.Linear(16, 4) if readout_weights else layer.VotingLayer(4)
        self.fc1, self.lif1 = layer.Linear(12, 16), neuron.LIFNode(tau=2.0)
        self.fc2 = layer.Linear(16, 16)  # VotingLayer(4) pools the 16 output neurons into 4 classes
        self.lif2 = neuron.LIFNode(tau=2.0, v_threshold=0.5)

    def forward(self, x):
        return self.out(self.lif2(self.fc2(self.lif1(self.fc1(x)))))


def test_the_readout_is_what_runs_after_the_last_neuron():
    x, y = torch.rand(4, 8, 12) * 3, torch.randint(0, 4, (8,))
    model = _ReadoutRegisteredFirst()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), num_classes=4)
    before = model.out.bias.detach().clone()
    stats = learner.step(x, y)
    assert not learner.neuron_output and len(stats.layer_losses) == 2
    assert not torch.equal(model.out.bias, before)  # the readout is trained by its cross-entropy
    learner.unwrap()
    # a weightless VotingLayer after the last neuron: that neuron's layer is the readout, trained through it
    model = _ReadoutRegisteredFirst(readout_weights=False)
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), num_classes=4)
    before = model.fc2.weight.detach().clone()
    stats = learner.step(x, y)
    assert learner.neuron_output and len(stats.layer_losses) == 1 and stats.readout_loss > 0
    assert not torch.equal(model.fc2.weight, before)
    learner.unwrap()


def test_a_module_holding_the_last_neuron_is_no_readout():
    """The model's own weight (an input gain) or a block around the last neuron finishes after it: the
    model still ends with that neuron."""

    class Gained(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))
            self.net = _spike_output_mlp(seed=2, v_threshold=0.3)

        def forward(self, x):
            return self.net(x * self.gain)

    model = Gained()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    stats = learner.step(torch.rand(4, 8, 12) * 3, torch.randint(0, 4, (8,)))
    assert learner.neuron_output and len(stats.layer_losses) == 1
    learner.unwrap()


def test_spike_count_prediction_of_a_step_equals_predict():
    model = _spike_output_mlp(seed=3, v_threshold=0.3)
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), num_classes=4)
    x, y = torch.rand(6, 16, 12) * 3, torch.randint(0, 4, (16,))
    spikes = []
    handle = model[3].register_forward_hook(lambda m, i, o: spikes.append(o[:16]))
    stats = learner.step(x, y)
    handle.remove()
    counts = torch.stack(spikes).sum(0)
    assert torch.equal(stats.prediction, counts.argmax(-1)) and torch.equal(stats.prediction, learner.predict(x))
    learner.unwrap()


def test_predict_from_the_last_step_or_the_sum_over_steps():
    torch.manual_seed(2)
    model = _mlp()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), num_classes=4)
    x = torch.rand(6, 16, 12) * 3
    learner.step(x, torch.randint(0, 4, (16,)))
    readouts = []
    handle = model[2].register_forward_hook(lambda m, i, o: readouts.append(o.detach()))
    last = learner.predict(x)
    handle.remove()
    assert len(readouts) == 6 and torch.equal(last, readouts[-1].argmax(-1))
    summed = learner.predict(x, over="sum")
    assert torch.equal(summed, torch.stack(readouts).sum(0).argmax(-1)) and not torch.equal(summed, last)
    with pytest.raises(slr.WrapError, match="over must be 'last'.*'sum'"):
        learner.predict(x, over="mean")
    learner.unwrap()


def test_a_batch_of_one_class_is_reported_once():
    model = _mlp()
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    x = torch.rand(3, 4, 12) * 3
    with pytest.warns(RuntimeWarning, match="single class.*hidden layers get no update"):
        learner.step(x, torch.full((4,), 2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        learner.step(x, torch.full((4,), 2))  # once per learner
        learner.step(x, torch.tensor([0, 1, 2, 3]))
    learner.unwrap()


def test_num_classes_must_match_the_readout():
    for num_classes in (3, 6):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        learner = slr.wrap(model, rule="tp", optimizer=opt, num_classes=num_classes)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(slr.WrapError, match=rf"shape \(4, 4\) per step.*num_classes={num_classes}"):
            learner.step(torch.rand(3, 4, 12) * 2, torch.tensor([0, 1, 2, 0]))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        learner.unwrap()


def test_freeze_trains_only_chosen_layers():
    x = torch.rand(3, 8, 12) * 3
    y = torch.randint(0, 4, (8,))
    model = _mlp(hidden=(16, 16), seed=5)
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # make layer 1 spike
    before = [p.detach().clone() for p in model.parameters()]
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), num_classes=4)
    learner.freeze([0, "readout"])
    learner.step(x, y)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert changed == [False, False, True, True, False, False]  # layer 0 and readout frozen, layer 1 trained
    assert learner.state_dict()["frozen"] == [0, "readout"]
    learner.unfreeze()
    learner.step(x, y)
    assert not torch.equal(before[0], model[0].weight)
    with pytest.raises(slr.WrapError, match="do not exist"):
        learner.freeze([5]).step(x, y)
    with pytest.raises(slr.WrapError, match="hidden-layer positions"):
        learner.freeze(["conv1"])
    learner.unwrap()


# -- conv traces: per-position similarity (the authors' code) ------------------------------------------
def test_spatial_mean_loss_matches_per_position_loop():
    """spatial='mean': logits and label-path distances are per position over channels, averaged over the
    positions; checked against explicit loops over positions, value and gradient."""
    torch.manual_seed(1)
    data = torch.rand(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    label = torch.rand(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    prev = torch.rand(4, 5, 2, 2, dtype=torch.float64)
    P = 6
    logits = torch.zeros(4, 4, dtype=torch.float64)
    for p in range(P):
        h, w = divmod(p, 3)
        logits = logits + data[:, :, h, w] @ label[:, :, h, w].t() / P
    dist = torch.zeros(4, 4, dtype=torch.float64)
    for h in range(2):
        for w in range(2):
            v = prev[:, :, h, w]
            dist = dist + ((v[:, None, :] - v[None, :, :]) ** 2).sum(-1).sqrt() / 4
    ref_targets = torch.softmax(-dist, 1)
    targets = distance_soft_targets(prev, spatial="mean")
    torch.testing.assert_close(targets, ref_targets, rtol=1e-10, atol=1e-12)
    ours = contrastive_trace_loss(data, label, targets, spatial="mean")
    ref = -(ref_targets * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (data, label)), torch.autograd.grad(ref, (data, label))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # flat traces: both modes are the same; flatten on conv traces is the whole-vector form
    flat = torch.rand(4, 7, dtype=torch.float64)
    torch.testing.assert_close(distance_soft_targets(flat, spatial="mean"), distance_soft_targets(flat))
    assert not torch.allclose(contrastive_trace_loss(data, label, targets, spatial="flatten"), ours)
    with pytest.raises(ValueError, match="spatial"):
        contrastive_trace_loss(data, label, targets, spatial="sum")


# -- label path: one 2B batch or two calls of B ---------------------------------------------------------
def _conv_model(seed=0):
    torch.manual_seed(seed)
    lif = dict(tau=2.0, decay_input=False, v_reset=None, v_threshold=0.5, surrogate_function=surrogate.ATan())
    return nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.LIFNode(**lif), layer.MaxPool2d(2),
        layer.Conv2d(4, 6, 3, padding=1, bias=False), neuron.LIFNode(**lif),
        layer.Flatten(), layer.Linear(6 * 4 * 4, 3),
    )


def _snn_torch_model(seed=0):
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.6, init_hidden=True),
                         nn.Linear(16, 16), snn.Leaky(beta=0.6, init_hidden=True), nn.Linear(16, 4))


@pytest.mark.parametrize("kind", ["mlp_s", "mlp_m", "conv_m", "snntorch"])
def test_label_batch_separate_gives_the_same_updates_as_concat(kind):
    """Without batch norm the label path's inputs never meet the data path's in one normalisation, so
    running them as one 2B batch or as two calls of B (state swapped) must give the same parameters after
    several steps, each with an optimizer step per time step."""
    if kind == "conv_m":
        make, x = _conv_model, (torch.rand(4, 6, 2, 8, 8) < 0.3).float() * 2
        classes = 3
    elif kind == "snntorch":
        make, x = _snn_torch_model, torch.rand(4, 6, 12) * 3
        classes = 4
    else:
        make = lambda seed=0: _mlp(hidden=(16, 16), seed=seed, step_mode=kind[-1])  # noqa: E731
        x, classes = torch.rand(4, 6, 12) * 3, 4
    base = make()
    if kind == "conv_m":
        functional.set_step_mode(base, "m")
    with torch.no_grad():  # second hidden layer must fire for its loss to matter
        for m in base.modules():
            if isinstance(m, nn.Linear) and m.in_features == 16 and m.out_features == 16:
                m.weight.mul_(4.0)
    y = torch.arange(6) % classes
    params, stats = [], []
    for mode in ("concat", "separate"):
        model = copy.deepcopy(base)
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                           num_classes=classes, seed=3, label_batch=mode)
        for _ in range(2):
            st = learner.step(x, y)
        stats.append(st)
        assert learner.state_dict()["label_batch"] == mode
        pred = learner.predict(x)
        learner.unwrap()
        params.append([p.detach().clone() for p in model.parameters()])
        stats[-1].pred = pred
    assert stats[0].layer_losses == pytest.approx(stats[1].layer_losses, rel=1e-5)
    assert all(abs(v) > 0 for v in stats[0].layer_losses)
    for a, b, p0 in zip(params[0], params[1], base.parameters()):
        assert not torch.equal(a, p0.detach())  # every parameter was trained
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[0].pred, stats[1].pred)


@pytest.mark.parametrize("kind", ["SynapseFilter", "Delay"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_label_batch_separate_keeps_each_paths_own_state_of_other_layers(kind, step_mode):
    """A layer other than a neuron that carries state from step to step (a synapse filter's current, a
    delay's queue, which it changes in place) keeps one copy per path under 'separate', as the neurons do:
    the label path's step 0 must not see the data path's step 0. Same updates as 'concat' then."""
    if kind == "Delay" and step_mode == "m" and not _delay_keeps_a_queue_across_calls():
        pytest.skip("this release's multi-step Delay delays within each call only (refused by TP)")

    def make():
        torch.manual_seed(0)
        lif = dict(tau=2.0, step_mode=step_mode)
        mid = layer.SynapseFilter(tau=3.0, step_mode=step_mode) if kind == "SynapseFilter" \
            else layer.Delay(1, step_mode=step_mode)
        model = nn.Sequential(layer.Linear(8, 12, step_mode=step_mode), neuron.LIFNode(**lif), mid,
                              layer.Linear(12, 12, step_mode=step_mode), neuron.LIFNode(**lif),
                              layer.Linear(12, 4, step_mode=step_mode)).double()
        with torch.no_grad():  # the second hidden layer must fire
            model[3].weight.mul_(6.0)
            model[3].bias.fill_(0.3)
        return model

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 4, 8, generator=g, dtype=torch.float64) * 3, torch.tensor([0, 1, 2, 3])
    updates = []
    for mode in ("concat", "separate"):
        model = make()
        before = [p.detach().clone() for p in model.parameters()]
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                           num_classes=4, label_batch=mode, seed=0)
        learner.step(x, y)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert updates[0].abs().max() > 0.1
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-9, atol=1e-12)


def _delay_keeps_a_queue_across_calls():
    delay = layer.Delay(1, step_mode="m")
    delay(torch.ones(1, 1, 2))
    return bool(delay(torch.zeros(1, 1, 2)).sum() > 0)


def test_label_batch_separate_normalises_each_path_alone():
    """With batch norm the two modes differ on purpose: 'separate' normalises the data path over its own B
    samples, so its data-path output is that of the model run on the data alone."""
    torch.manual_seed(0)
    model = nn.Sequential(layer.Linear(12, 16), layer.BatchNorm1d(16),
                          neuron.LIFNode(tau=2.0, v_reset=None, surrogate_function=surrogate.ATan()),
                          layer.Linear(16, 4))
    x, y = torch.rand(1, 8, 12) * 3, torch.arange(8) % 4
    seen = []  # batch sizes that the BN layer normalised over in training mode
    for mode, sizes in (("concat", [16]), ("separate", [8, 8])):
        m_copy = copy.deepcopy(model)
        m_copy[1].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]) if m.training else None)
        learner = slr.wrap(m_copy, rule="tp", optimizer=torch.optim.SGD(m_copy.parameters(), lr=0.0),
                           num_classes=4, label_batch=mode)
        seen.clear()
        learner.step(x, y)
        learner.unwrap()
        assert seen == sizes
    with pytest.raises(slr.WrapError, match="label_batch"):
        slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4,
                 label_batch="both")


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_the_users_own_forward_of_a_tp_wrapped_model_is_the_plain_model(step_mode):
    """A validation loop of the user's own (per-step calls then reset_net, or one multi-step call) runs the
    model as it is, before and after step(): TP's trace hooks act only inside step() and predict()."""
    model = _mlp(hidden=(16,), step_mode=step_mode)
    plain = copy.deepcopy(model)
    x, y = torch.rand(4, 6, 12) * 3, torch.tensor([0, 1, 2, 3, 0, 1])
    x_val = torch.rand(4, 5, 12) * 3  # another batch size

    def own_forward(net):
        with torch.no_grad():
            out = torch.stack([net(x_t) for x_t in x_val]) if step_mode == "s" else net(x_val)
        functional.reset_net(net)
        return out

    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), 1e-2), num_classes=4)
    assert torch.equal(own_forward(model), own_forward(plain))
    learner.step(x, y)
    plain.load_state_dict(model.state_dict())
    first = own_forward(model)
    assert first.shape == (4, 5, 4) and torch.equal(first, own_forward(plain))
    assert torch.equal(own_forward(model), first)  # nothing carried over from one call to the next
    assert learner._traces == {}
    learner.unwrap()


def test_a_deep_copy_of_a_tp_learner_trains_its_own_model():
    model = _mlp(hidden=(16,))
    x, y = torch.rand(3, 6, 12) * 3, torch.tensor([0, 1, 2, 3, 0, 1])
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.Adam(model.parameters(), 1e-2), num_classes=4)
    learner.step(x, y)
    fork = copy.deepcopy(learner)
    before = snapshot(model)
    fork_stats = fork.step(x, y)
    assert_same_snapshot(before, snapshot(model))  # the original is untouched
    stats = learner.step(x, y)  # and the same step on the original gives the same result
    assert fork_stats.loss == stats.loss
    for a, b in zip(model.parameters(), fork.model.parameters()):
        assert torch.equal(a, b)
    learner.unwrap()
    fork.unwrap()


def test_tp_allocates_nothing_the_size_of_the_whole_input():
    """TP's memory does not grow with T: no step of it (the input checks, the label projection's scale on
    the first batch) makes a temporary of the whole [T, B, ...] input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, y = torch.rand(64, 6, 12) * 3, torch.tensor([0, 1, 2, 3, 0, 1])

    class LargestNew(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                    LargestNew.largest = max(LargestNew.largest, t.numel())
            return out

    model = _mlp(hidden=(16,))
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    with LargestNew():
        learner.step(x, y)  # the first batch: the label projection is made here
        learner.step(x, y)
    assert 0 < LargestNew.largest < x[0].numel() * 4, (LargestNew.largest, x.numel())
    learner.unwrap()


def test_a_users_hook_on_a_neuron_acts_the_same_added_before_or_after_wrapping():
    """TP's output hook ran before a hook added after wrap, so a hook that scales a neuron's spikes scaled
    what TP passed on, not what its trace is made of (first layer's update 1.99 vs 0.89 summed)."""
    x, y = torch.rand(4, 6, 12, dtype=torch.float64) * 3, torch.arange(6) % 4
    updates = []
    for after in (False, True):
        model = _mlp(hidden=(16, 16), seed=0, step_mode="s").double()
        with torch.no_grad():  # the second hidden layer fires too
            model[2].weight.mul_(4.0)
        scale = lambda module, args, output: output * 0.5  # noqa: E731
        if not after:
            model[1].register_forward_hook(scale)
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), num_classes=4,
                           seed=0)
        if after:
            model[1].register_forward_hook(scale)
        before = [p.detach().clone() for p in model.parameters()]
        learner.step(x, y)
        updates.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        learner.unwrap()
    assert float(updates[0][0].abs().sum()) > 0
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


class _Counter(nn.Module):
    """Counts its calls in a buffer in train and eval mode alike, as a QAT observer keeps its min/max."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


def test_the_first_batchs_probe_forwards_leave_every_buffer_as_it_was():
    """TP's layer-order forward (eval mode) and online SLTT's time-layout probe spent what counts in eval
    mode too (QAT fake-quant observers: min/max 1.3 off a model wrapped after prepare_qat)."""
    x, y = torch.rand(4, 6, 12) * 3, torch.arange(6) % 4
    model = _mlp(hidden=(16, 16), seed=0, step_mode="s")
    model.insert(0, _Counter())
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4)
    learner.step(x, y)
    assert int(model[0].calls) == 4  # one call per step (data and label paths as one batch)
    learner.unwrap()

    class Rate(nn.Module):
        def __init__(self):
            super().__init__()
            self.count, self.body = _Counter(), _mlp(hidden=(16,), seed=0, step_mode="m")

        def forward(self, x):
            return self.body(self.count(x)).mean(0)

    model = Rate()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    learner.step(x, y)
    assert int(model.count.calls) == 4  # a reducing model: one call per step, the probe's calls undone
    learner.unwrap()


class _RunningMax(nn.Module):
    """Keeps the largest input per feature in a buffer that starts empty and is resized in place at the
    first call, as torch's QAT observers keep their min/max."""

    def __init__(self):
        super().__init__()
        self.register_buffer("largest", torch.empty(0))

    def forward(self, x):
        with torch.no_grad():
            if self.largest.numel() == 0:
                self.largest.resize_(x.shape[-1]).fill_(-math.inf)
            torch.maximum(self.largest, x.detach().amax(0), out=self.largest)
        return x


def test_a_buffer_resized_in_place_by_the_first_forward_is_put_back_as_it_was():
    """Putting buffers back after the layer-order forward failed on one the forward had resized in place
    (an observer's first min/max: "size of tensor a (12) must match the size of tensor b (0)")."""
    x, y = torch.rand(4, 6, 12) * 3, torch.arange(6) % 4
    seen = []
    for sized in (False, True):
        model = _mlp(hidden=(16, 16), seed=0, step_mode="s")
        model.insert(0, _RunningMax())
        if sized:  # already sized: nothing to resize
            model[0].largest = torch.full((12,), -math.inf)
        learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=4,
                           seed=0)
        learner.step(x, y)
        seen.append(model[0].largest.clone())
        learner.unwrap()
    assert torch.equal(seen[0], seen[1]) and bool(torch.isfinite(seen[0]).all())
