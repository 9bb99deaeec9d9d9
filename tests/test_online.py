"""Online SLTT and SLTT-K: the driver's contract (steps, stats, losses, predict, step modes)."""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from models import LoopsOverTime, sj_conv, sj_mlp, snn_sequential
from conftest import skip_unless_eval_mode_neurons_have_gradients

pytest.importorskip("spikingjelly")
pytest.importorskip("snntorch")


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _online(model, x, y, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    learner = slr.wrap(model, rule="sltt", optimizer=opt, **options)
    stats = learner.step(x, y)
    learner.unwrap()
    return stats, _grads(model)


@pytest.mark.parametrize("make", [lambda: sj_mlp(step_mode="s"), lambda: sj_mlp(step_mode="m"), lambda: snn_sequential()])
def test_K_equal_T_is_sltt(make):
    x, y = torch.rand(5, 4, 12) * 2, torch.randint(0, 5, (4,))
    torch.manual_seed(0)
    stats_full, g_full = _online(make(), x, y)
    torch.manual_seed(0)
    stats_k, g_k = _online(make(), x, y, K=5, seed=3)
    assert stats_k.steps == [0, 1, 2, 3, 4] == stats_full.steps
    assert stats_k.loss == pytest.approx(stats_full.loss, rel=1e-6)
    for a, b in zip(g_full, g_k):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_sltt_k_selects_and_matches_reference():
    """SLTT-K's gradient is the sum over the K drawn steps of the per-step SLTT gradients (loss / T)."""
    from spikingjelly.activation_based import functional

    torch.manual_seed(0)
    x, y = torch.rand(8, 4, 12) * 2, torch.randint(0, 5, (4,))
    model = sj_mlp(step_mode="s")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    stats, grads = _online(model, x, y, K=3, seed=11)
    assert len(stats.steps) == 3 and len(set(stats.steps)) == 3 and stats.steps == sorted(stats.steps)
    # same seed, same draws
    stats2, _ = _online(sj_mlp(step_mode="s"), x, y, K=3, seed=11)
    assert stats2.steps == stats.steps
    # reference: plain per-step loop, state detached each step, backward only at the drawn steps
    ref = sj_mlp(step_mode="s")
    ref.load_state_dict(init)
    functional.reset_net(ref)
    total = 0.0
    for t in range(8):
        for m in (ref[1], ref[3]):
            if isinstance(m.v, torch.Tensor):
                m.v = m.v.detach()
        with torch.set_grad_enabled(t in stats.steps):
            out = ref(x[t])
            if t in stats.steps:
                loss = F.cross_entropy(out, y) / 8
                loss.backward()
                total += loss.item()
    assert stats.loss == pytest.approx(total, rel=1e-6)
    for a, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


def test_sltt_k_without_a_seed_follows_torch_manual_seed_and_leaves_torchs_stream_alone():
    def draws(torch_seed):
        torch.manual_seed(torch_seed)
        model = sj_mlp(step_mode="s")
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), K=2)
        after_wrap = torch.rand(3)  # the user's own stream goes on as without the learner
        torch.manual_seed(torch_seed)
        sj_mlp(step_mode="s")
        assert torch.equal(after_wrap, torch.rand(3))
        x, y = torch.rand(8, 4, 12), torch.randint(0, 5, (4,))
        steps = [learner.step(x, y).steps for _ in range(6)]
        learner.unwrap()
        return steps

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)  # 6 batches of 2 of 8 steps: equal draws by chance have odds ~1e-9


class _Rate(nn.Module):
    """A multi-step model whose forward returns the firing rate over time (as Spikformer's does), or, with
    ``reduce=False``, the output sequence."""

    def __init__(self, reduce, how="mean"):
        super().__init__()
        self.body, self.reduce, self.how = sj_mlp(step_mode="m"), reduce, how

    def forward(self, x):
        out = self.body(x)
        if not self.reduce:
            return out
        return {"mean": lambda: out.mean(0), "sum": lambda: out.sum(0), "max": lambda: out.amax(0),
                "last": lambda: out[-1], "relu head": lambda: torch.relu(out.mean(0) - 0.5)}[self.how]()


@pytest.mark.parametrize("how", ["mean", "sum", "max", "last", "relu head"])
def test_a_reduction_over_time_other_than_a_mean_is_said_once(how):
    """Online mode trains such a model on each step's output, mean_t loss(o_t, y): the documented meaning
    for a rate (a mean over time). A max-over-time readout (SHD), a sum or the last step were trained so
    without a word (0.13 off the SLTT gradient of CE(max_t o_t), cosine 0.76): now an OnlineLossWarning
    names the reduction and points to zero-change mode."""
    import warnings

    torch.manual_seed(0)
    model = _Rate(True, how)
    with torch.no_grad():
        model.body[0].weight.mul_(3.0)  # spikes: the one-step outputs differ from step to step
        model.body[2].weight.mul_(4.0)
        model.body[2].bias.add_(0.5)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.rand(6, 4, 12) * 2, torch.randint(0, 5, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.step(x, y)
        learner.step(x, y)
        learner.predict(x)
    said = [str(w.message) for w in caught if issubclass(w.category, slr.OnlineLossWarning)]
    learner.unwrap()
    if how == "mean":
        assert not said
        return
    assert len(said) == 1
    kind = {"sum": "a sum", "max": "a max", "last": "the last", "relu head": "not the mean"}[how]
    assert re.search(rf"its output is [a-z ]*\b{kind}\b[a-z ]* of its one-step outputs", said[0])
    assert "zero-change mode" in said[0]


@pytest.mark.parametrize("options", [dict(K=3, seed=2), dict(chunk=3), dict(chunk=2, K=5, seed=1)])
def test_a_model_that_returns_its_rate_trains_and_predicts_as_its_per_step_twin(options):
    x = [torch.rand(6, 4, 12) * 2 for _ in range(2)]
    y = [torch.randint(0, 5, (4,)) for _ in range(2)]
    runs = []
    for reduce in (True, False):
        torch.manual_seed(0)
        model = _Rate(reduce)
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), **options)
        first_predict = learner.predict(x[0])  # before any step: the layout is learned here
        stats = [learner.step(x_b, y_b) for x_b, y_b in zip(x, y)]
        runs.append((first_predict, learner.predict(x[1]), stats, [p.detach().clone() for p in model.parameters()]))
        learner.unwrap()
    (p0, p1, s_rate, w_rate), (q0, q1, s_seq, w_seq) = runs
    assert torch.equal(p0, q0) and torch.equal(p1, q1)
    assert [s.steps for s in s_rate] == [s.steps for s in s_seq]
    for a, b in zip(s_rate, s_seq):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for a, b in zip(w_rate, w_seq):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 3])
def test_single_step_neurons_in_multi_step_containers_train_online_as_multi_step_neurons(chunk):
    """SpikingJelly's MultiStepContainer around single-step neurons (with SeqToANNContainer around the
    rest) makes a model that takes [T, B, ...]: the online learner feeds it chunks without multi_step=True,
    with the same update as the same network in step_mode='m'."""
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    twin = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), neuron.LIFNode(tau=2.0),
                         layer.Flatten(), layer.Linear(4 * 6 * 6, 5), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(twin, "m")
    model = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)),
        layer.MultiStepContainer(neuron.LIFNode(tau=2.0)),
        layer.SeqToANNContainer(nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
        layer.MultiStepContainer(neuron.LIFNode(tau=2.0)),
    )
    pairs = [(model[0][0], twin[0]), (model[0][1], twin[1]), (model[2][1], twin[4])]
    for a, b in pairs:
        a.load_state_dict(b.state_dict())
    x, y = torch.rand(6, 3, 2, 6, 6) * 2, torch.randint(0, 5, (3,))
    for net in (twin, model):
        learner = slr.wrap(net, rule="sltt", optimizer=torch.optim.SGD(net.parameters(), lr=0.0), chunk=chunk)
        learner.step(x, y)
        learner.unwrap()
    for a, b in pairs:
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-5, atol=1e-7)


def test_sample_last():
    stats, _ = _online(sj_mlp(), torch.rand(6, 2, 12), torch.randint(0, 5, (2,)), K=2, sample="last")
    assert stats.steps == [4, 5]


def test_stats_counts_and_predict_agree():
    model = sj_conv("m")
    x, y = (torch.rand(4, 3, 2, 8, 8) < 0.3).float(), torch.randint(0, 5, (3,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    learner = slr.wrap(model, rule="sltt", optimizer=opt, K=2, seed=0)
    model[1].eval()  # so BN gives the same outputs in both passes
    stats = learner.step(x, y)
    assert stats.output_counts.shape == (3, 5) and stats.T == 4
    pred = learner.predict(x)
    assert pred.shape == (3,) and pred.dtype == torch.long
    assert torch.equal(pred, stats.output_counts.argmax(-1))
    assert stats.correct(y) == int((pred == y).sum())
    learner.unwrap()


def test_online_equals_zero_change_single_step():
    """For a single-step model (BN per step in both), the online driver and the user's own loop under
    zero-change wrapping give the same gradient."""
    from spikingjelly.activation_based import functional

    x, y = (torch.rand(5, 3, 2, 8, 8) < 0.3).float(), torch.randint(0, 5, (3,))
    torch.manual_seed(4)
    a = sj_conv("s")
    b = sj_conv("s")
    b.load_state_dict(a.state_dict())
    _, g_online = _online(a, x, y)
    learner = slr.wrap(b, rule="sltt")
    loss = sum(F.cross_entropy(b(x[t]), y) for t in range(5)) / 5
    loss.backward()
    functional.reset_net(b)
    learner.unwrap()
    for ga, p in zip(g_online, b.parameters()):
        torch.testing.assert_close(ga, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", "ce+mse", "ce+mse_onehot", "callable"])
def test_named_and_callable_losses(loss):
    x, y = torch.rand(4, 3, 12) * 2, torch.randint(0, 5, (3,))
    fn = {"mse": lambda o, t: F.mse_loss(o, F.one_hot(t, 5).float()),
          "ce+mse": lambda o, t: 0.95 * F.cross_entropy(o, t) + 0.05 * F.mse_loss(o, torch.ones_like(o)),
          "ce+mse_onehot": lambda o, t: 0.95 * F.cross_entropy(o, t) + 0.05 * F.mse_loss(o, F.one_hot(t, 5).float()),
          "callable": lambda o, t: F.cross_entropy(o, t)}[loss]
    torch.manual_seed(2)
    stats_a, g_a = _online(sj_mlp(), x, y, loss=loss if loss != "callable" else fn)
    torch.manual_seed(2)
    stats_b, g_b = _online(sj_mlp(), x, y, loss=lambda o, t: fn(o, t))
    assert stats_a.loss == pytest.approx(stats_b.loss, rel=1e-6)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b)


def test_snntorch_losses():
    import snntorch.functional as SF

    x, y = torch.rand(4, 3, 12) * 2, torch.randint(0, 5, (3,))
    torch.manual_seed(5)
    s_ce, g_ce = _online(snn_sequential(), x, y, loss="ce")
    torch.manual_seed(5)
    s_rate, g_rate = _online(snn_sequential(), x, y, loss=SF.ce_rate_loss())
    assert s_rate.loss == pytest.approx(s_ce.loss, rel=1e-6)
    for a, b in zip(g_ce, g_rate):
        torch.testing.assert_close(a, b)
    # the membrane loss reads the membrane, the last element of (spk, mem), (spk, syn, mem), ...
    torch.manual_seed(5)
    model = snn_sequential()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                       loss=SF.mse_membrane_loss())
    assert learner.output == -1
    learner.step(x, y)
    learner.unwrap()
    membrane_loss = SF.mse_membrane_loss()
    by_index = []
    for options in (dict(loss=membrane_loss), dict(loss=lambda o, t: membrane_loss(o.unsqueeze(0), t), output=2),
                    dict(loss=lambda o, t: membrane_loss(o.unsqueeze(0), t), output=1)):
        torch.manual_seed(5)
        by_index.append(_online(snn_sequential("Synaptic"), x, y, **options))  # (spk, syn, mem)
    (s_mem, g_mem), (s_two, g_two), (s_syn, g_syn) = by_index
    assert s_mem.loss == s_two.loss != s_syn.loss
    for a, b in zip(g_mem, g_two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(slr.LossError, match=r"target per time step \(time_var_targets=True\)"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                 loss=SF.mse_membrane_loss(time_var_targets=True))
    for bad in (SF.ce_count_loss(), SF.mse_count_loss()):
        with pytest.raises(slr.LossError, match="cannot be used by an online rule"):
            slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss=bad)
    with pytest.raises(slr.LossError, match="unknown loss 'hinge'"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss="hinge")


def test_a_membrane_loss_on_a_model_that_returns_spikes_is_refused():
    """A model whose last Leaky has no output=True returns spikes alone; the membrane loss had read them
    as the membrane without a word. output=0 says the one tensor is what the loss wants."""
    import snntorch as snn
    import snntorch.functional as SF

    def build():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.8, init_hidden=True), nn.Linear(16, 5),
                             snn.Leaky(beta=0.8, init_hidden=True))

    x, y = torch.rand(4, 3, 12) * 30, torch.randint(0, 5, (3,))
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       loss=SF.mse_membrane_loss())
    for _ in range(2):  # refused again at the next step() (a notebook cell run twice)
        with pytest.raises(slr.LossError, match=r"reads the membrane.*only 0s and 1s: spikes.*output=True"):
            learner.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    learner.unwrap()
    model = build()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       loss=SF.mse_membrane_loss(), output=0)
    assert learner.step(x, y).loss > 0


def test_output_choice():
    x, y = torch.rand(4, 3, 12) * 2, torch.randint(0, 5, (3,))
    torch.manual_seed(6)
    _, g_mem = _online(snn_sequential(), x, y, output=1)
    torch.manual_seed(6)
    _, g_fn = _online(snn_sequential(), x, y, output=lambda out: out[1])
    for a, b in zip(g_mem, g_fn):
        torch.testing.assert_close(a, b)
    model = snn_sequential()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), output=4)
    with pytest.raises(slr.LayoutError, match="returns 2 outputs"):
        learner.step(x, y)
    learner.unwrap()


def test_multistep_model_keeps_its_step_mode():
    model = sj_conv("m")
    modes = [getattr(m, "step_mode", None) for m in model.modules()]
    stats, _ = _online(model, (torch.rand(4, 2, 2, 8, 8) < 0.3).float(), torch.randint(0, 5, (2,)))
    assert [getattr(m, "step_mode", None) for m in model.modules()] == modes


def test_learner_state_dict_round_trip():
    model = sj_mlp()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), K=2, seed=9)
    learner.select_steps(10)
    state = learner.state_dict()
    after = [learner.select_steps(10) for _ in range(3)]
    learner.load_state_dict(state)
    assert [learner.select_steps(10) for _ in range(3)] == after
    learner.unwrap()


def test_nograd_chunk_changes_nothing_but_speed_and_memory():
    skip_unless_eval_mode_neurons_have_gradients()
    x, y = (torch.rand(9, 3, 2, 8, 8) < 0.3).float(), torch.randint(0, 5, (3,))
    results = []
    for chunk in (1, 4, 9):
        torch.manual_seed(8)
        model = sj_conv("m")
        model.eval()
        stats, grads = _online(model, x, y, K=2, seed=1, nograd_chunk=chunk)
        results.append((stats, grads))
    for stats, grads in results[1:]:
        assert stats.steps == results[0][0].steps
        torch.testing.assert_close(stats.output_counts, results[0][0].output_counts)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(slr.WrapError, match="nograd_chunk"):
        _online(sj_conv("m"), x, y, K=2, nograd_chunk=0)


def test_the_time_layout_probe_leaves_torchs_random_state_alone():
    from spikingjelly.activation_based import encoding, functional, layer, neuron

    class Encoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = encoding.PoissonEncoder(step_mode="m")  # draws from torch's generator in any mode
            self.net = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0), layer.Linear(16, 5))
            functional.set_step_mode(self.net, "m")

        def forward(self, x):
            return self.net(self.enc(x))

    x, y = torch.rand(4, 3, 12), torch.tensor([0, 1, 2])
    results = []
    for probe_first in (True, False):
        torch.manual_seed(0)
        model = Encoded()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        if not probe_first:
            learner._reduces_time = False  # as if already known: no probe
        results.append((learner.step(x, y).loss, [p.detach().clone() for p in model.parameters()]))
        learner.unwrap()
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_a_batch_first_multi_step_output_is_refused_not_taken_for_a_rate():
    class BatchFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = sj_mlp(step_mode="m")

        def forward(self, x):
            return self.net(x).transpose(0, 1)  # [B, T, C]

    model = BatchFirst()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), chunk=2)
    x, y = torch.rand(4, 3, 12), torch.tensor([0, 1, 2])
    for call in (lambda: learner.predict(x), lambda: learner.step(x, y)):
        with pytest.raises(slr.LayoutError, match=r"returned shape \(3, [24], 5\).*per-step outputs"):
            call()
    learner.unwrap()


def test_a_numpy_memory_of_a_users_layer_is_left_as_it_is():
    import numpy as np
    from spikingjelly.activation_based import base, layer, neuron

    class HostCounter(base.MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("seen", np.zeros(3))

        def forward(self, x):
            self.seen = self.seen + 1
            return x

    torch.manual_seed(0)
    model = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0), HostCounter(), layer.Linear(16, 5))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert math.isfinite(learner.step(torch.rand(4, 3, 12), torch.tensor([0, 1, 2])).loss)
    learner.unwrap()


def test_diagnose_compares_a_rate_model_on_per_step_calls_as_its_sequence_twin():
    x, y = torch.rand(4, 3, 12) * 2, torch.randint(0, 5, (3,))
    found = []
    for reduce in (True, False):
        torch.manual_seed(0)
        found.append(slr.diagnose(_Rate(reduce), x, y))
    rate, sequence = found
    assert rate.loss == pytest.approx(sequence.loss, rel=1e-6)
    assert rate.cosine == pytest.approx(sequence.cosine, rel=1e-5)
    assert [round(layer.cosine, 5) for layer in rate.layers] == [round(layer.cosine, 5) for layer in sequence.layers]


def test_a_deep_copy_of_a_learner_is_the_learner_of_its_model_copy():
    import copy

    model = sj_mlp(step_mode="s")
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    fork = copy.deepcopy(learner)
    assert slr.learner_of(fork.model) is fork and slr.learner_of(model) is learner
    fork.step(torch.rand(4, 3, 12), torch.randint(0, 5, (3,)))
    slr.unwrap(fork.model)
    assert not fork.wrapped and learner.wrapped and slr.learner_of(fork.model) is None
    assert all(not m._forward_pre_hooks for m in fork.model.modules())
    learner.unwrap()


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_multi_step_true_on_neurons_that_take_one_step_per_call_is_refused(rule):
    """snnTorch neurons fed [c, B, ...] take the steps for samples: no state from step to step, gradients
    0.5-1.9 off and predict() all zeros before, without a word. A forward that steps through the
    sequence itself is what multi_step=True is for, and trains as the model fed step by step."""
    x, y = torch.rand(6, 5, 12) * 2, torch.randint(0, 5, (5,))
    options = dict(num_classes=5) if rule == "tp" else dict(chunk=3)
    model = snn_sequential()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = slr.wrap(model, rule=rule, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       multi_step=True, **options)
    message = r"fed \[c, B, \.\.\.\] sequences \(multi_step=True\).*'1' \(snntorch.Leaky\).*Drop multi_step=True"
    with pytest.raises(slr.LayoutError, match=message):
        learner.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if rule == "sltt":
        with pytest.raises(slr.LayoutError, match=message):
            learner.predict(x)
    learner.unwrap()
    if rule == "sltt":
        torch.manual_seed(0)
        _, g_plain = _online(snn_sequential(), x, y, chunk=3)
        torch.manual_seed(0)
        _, g_looped = _online(LoopsOverTime(snn_sequential()), x, y, chunk=3, multi_step=True)
        for a, b in zip(g_plain, g_looped):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _TokensPerStep(nn.Module):
    """One step [B, F] -> [B, C] whose neurons see torch's sequence-first tokens [N, B, H]."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.tokens = 3
        self.emb, self.lif, self.out = nn.Linear(12, 3 * 8), neuron.LIFNode(v_threshold=0.3), nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.emb(x).reshape(x.shape[0], self.tokens, 8).transpose(0, 1)  # [N, B, H]
        return self.out(self.lif(tokens).mean(0))


def test_multi_step_true_check_passes_a_forward_stepping_over_tokens_and_catches_the_rest():
    """Neurons of a self-stepping forward may get [N, B, H] tokens (not [B, ...]): only an input that is
    the call's [c, B, ...] sequence itself counts as steps taken for samples. predict() before any step()
    with T == B, and a batch norm after the neurons, are caught too (they had passed, and given torch's
    shape error)."""
    x, y = torch.rand(5, 4, 12) * 2, torch.randint(0, 5, (4,))
    torch.manual_seed(0)
    _, g_step = _online(_TokensPerStep(), x, y)
    torch.manual_seed(0)
    _, g_seq = _online(LoopsOverTime(nn.Sequential(_TokensPerStep(), nn.Unflatten(0, (1, -1)))), x, y,
                       multi_step=True)
    for a, b in zip(g_step, g_seq):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for tokens in (1, 2):  # one or two tokens: the first dims (N, B) look like a chunk's (c, B)
        model = LoopsOverTime(nn.Sequential(_TokensPerStep(), nn.Unflatten(0, (1, -1))))
        model.net[0].emb, model.net[0].tokens = nn.Linear(12, tokens * 8), tokens
        _online(model, x, y, multi_step=True)
    message = r"fed \[c, B, \.\.\.\] sequences \(multi_step=True\)"
    from spikingjelly.activation_based import layer, neuron

    merging = nn.Sequential(layer.SeqToANNContainer(nn.Linear(12, 16), neuron.LIFNode(v_threshold=0.3)),
                            layer.SeqToANNContainer(nn.Linear(16, 5)))  # a one-step neuron on [c * B, 16]
    learner = slr.wrap(merging, rule="sltt", optimizer=torch.optim.SGD(merging.parameters(), lr=0.1),
                       multi_step=True)
    with pytest.raises(slr.LayoutError, match=message):
        learner.step(x, y)
    learner.unwrap()
    model = snn_sequential()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), multi_step=True)
    with pytest.raises(slr.LayoutError, match=message):
        learner.predict(torch.rand(3, 3, 12))  # T == B
    learner.unwrap()
    import snntorch as snn

    model = nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.8, init_hidden=True), nn.BatchNorm1d(16),
                          nn.Linear(16, 5))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), multi_step=True)
    with pytest.raises(slr.LayoutError, match=message):
        learner.step(x, y)
    learner.unwrap()



class _RateThenNeuron(nn.Module):
    """Spikformer-like body (multi-step, then the rate over time) with a one-step LIF read-out on the rate."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.fc = layer.SeqToANNContainer(nn.Linear(12, 16))
        self.lif = neuron.LIFNode(v_threshold=0.3, step_mode="m")
        self.head, self.out = nn.Linear(16, 5), neuron.LIFNode(v_threshold=0.3)

    def forward(self, x_seq):
        return self.out(self.head(self.lif(self.fc(x_seq)).mean(0)))


@pytest.mark.parametrize("options", [{}, dict(chunk=2), dict(K=2, nograd_chunk=3)])
def test_a_neuron_after_the_rate_of_a_time_reducing_model_is_not_taken_for_merged_steps(options):
    """It runs once per call, as it should: the model is called one step at a time (the first batch's
    two-step probe call had flagged it as having taken the steps for samples)."""
    torch.manual_seed(0)
    model = _RateThenNeuron()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **options)
    x, y = torch.rand(5, 4, 12) * 2, torch.tensor([0, 1, 2, 3])
    assert learner.step(x, y).loss > 0 and learner.predict(x).shape == (4,)
    learner.unwrap()


def test_the_reduction_warning_points_at_the_users_call_and_can_be_made_an_error():
    """Raised inside the probe, a warnings filter set to "error" made the probe take a max-over-time model
    for one that does not reduce (a LayoutError at the next call, and no warning); the warning named a line
    of the package, so a filter on the user's module missed it."""
    import warnings

    torch.manual_seed(0)
    model = _Rate(True, "max")
    with torch.no_grad():
        model.body[0].weight.mul_(3.0)
        model.body[2].weight.mul_(4.0)
        model.body[2].bias.add_(0.5)
    x, y = torch.rand(6, 4, 12) * 2, torch.randint(0, 5, (4,))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.step(x, y)
    (said,) = [w for w in caught if issubclass(w.category, slr.OnlineLossWarning)]
    assert said.filename == __file__
    learner.unwrap()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", slr.OnlineLossWarning)
        with pytest.raises(slr.OnlineLossWarning, match="its output is .*a max"):
            learner.step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", slr.OnlineLossWarning)
        learner.step(x, y)  # the next batch probes again, and trains
    learner.unwrap()


class _PoissonRate(nn.Module):
    """A mean over time of a net fed Poisson spikes drawn in its own forward (as SpikingJelly's tutorials
    encode images), in eval mode too."""

    def __init__(self):
        super().__init__()
        self.body = _Rate(True, "mean")

    def forward(self, x):
        return self.body((torch.rand_like(x) < x / 3).float() * 3)


def test_a_mean_over_time_with_random_draws_in_the_forward_gets_no_reduction_warning():
    import warnings

    torch.manual_seed(0)
    model = _PoissonRate()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.step(torch.rand(6, 4, 12) * 2, torch.randint(0, 5, (4,)))
    assert not [w for w in caught if issubclass(w.category, slr.OnlineLossWarning)]
    learner.unwrap()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mean_over_time_in_half_precision_gets_no_reduction_warning(dtype):
    """A mean-reducing model in bfloat16/float16 sums in another order per call: 1e-4 of the scale was
    below its rounding, and 10 seeds of 10 were told to use zero-change mode."""
    import warnings

    class MeanThenHead(nn.Module):  # Spikformer's shape: the rate over time, then a linear head
        def __init__(self):
            super().__init__()
            self.body, self.head = _Rate(True, "mean"), nn.Linear(5, 5)

        def forward(self, x):
            return self.head(self.body(x))

    for seed in range(3):
        torch.manual_seed(seed)
        model = MeanThenHead().to(dtype)
        with torch.no_grad():
            model.body.body[0].weight.mul_(3.0)
            model.body.body[2].weight.mul_(4.0)
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", slr.OnlineLossWarning)
            learner.predict((torch.rand(6, 4, 12) * 2).to(dtype))
        learner.unwrap()
