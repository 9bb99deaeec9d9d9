"""Online SLTT with ``chunk=c``: c steps per forward and per backward, the same SLTT gradients, fewer
backward calls, more activations held; ``chunk="auto"`` from a memory budget. (The per-neuron gradient
checks against the hand-written reference are in test_sltt_reference.py::test_api_online_mode_chunked.)"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from snn_localrules.memory import SavedBytes, memory_budget, storage_keys
from tests.models import sj_conv, sj_mlp, snn_sequential

T, B = 7, 6


def _data(batches=2, features=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(T, B, features, generator=g) * 2.0, torch.randint(0, 5, (B,), generator=g))
            for _ in range(batches)]


def _sj_conv_no_bn(step_mode):
    from spikingjelly.activation_based import functional, layer, neuron

    model = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), neuron.LIFNode(tau=2.0, detach_reset=True),
        layer.Conv2d(4, 4, 3, padding=1), neuron.IFNode(v_reset=None),
        layer.Flatten(), layer.Linear(4 * 6 * 6, 5), neuron.LIFNode(tau=3.0),
    )
    functional.set_step_mode(model, step_mode)
    return model


MODELS = {
    "sj-mlp-s": (lambda: sj_mlp("LIFNode", step_mode="s", tau=2.0), 12),
    "sj-mlp-m": (lambda: sj_mlp("ParametricLIFNode", step_mode="m"), 12),
    "sj-conv-m": (lambda: _sj_conv_no_bn("m"), (1, 6, 6)),
    "snntorch": (lambda: snn_sequential("Leaky"), 12),
}


def _batches(features):
    if isinstance(features, tuple):
        g = torch.Generator().manual_seed(5)
        return [(torch.rand(T, B, *features, generator=g) * 2.0, torch.randint(0, 5, (B,), generator=g))
                for _ in range(2)]
    return _data(features=features)


def _train(name, chunk, K=None, momentum=0.9):
    build, features = MODELS[name]
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
    learner = slr.wrap(model, rule="sltt", optimizer=optimizer, chunk=chunk, K=K, seed=11)
    losses = [learner.step(x, y).loss for x, y in _batches(features)]
    return model, learner, losses


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [2, 3, T])
def test_chunked_training_equals_one_step_per_backward(name, chunk):
    reference, _, ref_losses = _train(name, 1)
    model, _, losses = _train(name, chunk)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sj-mlp-s", "sj-mlp-m"])
def test_chunk_with_sltt_k_backpropagates_the_same_steps(name):
    reference, ref_learner, _ = _train(name, 1, K=4)
    model, learner, _ = _train(name, 2, K=4)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(learner.generator.get_state(), ref_learner.generator.get_state())


def _count_backwards(model, learner, x, y):
    calls = []
    weight = next(p for p in model.parameters() if p.requires_grad)
    handle = weight.register_hook(lambda g: calls.append(1))  # fires once per backward through it
    try:
        stats = learner.step(x, y)
    finally:
        handle.remove()
    return len(calls), stats


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, T, T + 5])
def test_one_backward_per_chunk(chunk):
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), chunk=chunk)
    (x, y), _ = _data()
    backwards, stats = _count_backwards(model, learner, x, y)
    assert backwards == math.ceil(T / chunk)
    assert stats.steps == list(range(T))


def test_chunks_do_not_span_sltt_k_gaps():
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       chunk=3, K=5, sample="last")
    (x, y), _ = _data()
    backwards, stats = _count_backwards(model, learner, x, y)
    assert stats.steps == [2, 3, 4, 5, 6] and backwards == 2  # [2, 3, 4] and [5, 6]


def _saved_per_step(model, x, y, chunk):
    """Most bytes autograd holds for one backward, measured in the learner's own loop."""
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), chunk=chunk)
    most = []
    backprop = learner._backprop

    def measured(x_chunk, y, **kwargs):  # every backward of the batch, through a meter
        meter = SavedBytes(storage_keys([x, *model.parameters(), *model.buffers()]), packer=learner.packer)
        most.append(meter)
        return backprop(x_chunk, y, **{**kwargs, "saved": meter})

    learner._backprop = measured
    try:
        learner.step(x, y)
    finally:
        learner.unwrap()
    return max(m.total for m in most)


def test_chunk_holds_c_steps_of_activations():
    model = _sj_conv_no_bn("m")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, B, 1, 6, 6, generator=g) * 2, torch.randint(0, 5, (B,), generator=g)
    one = _saved_per_step(model, x, y, 1)
    four = _saved_per_step(model, x, y, 4)
    assert 3.5 * one <= four <= 4.5 * one


@pytest.mark.parametrize("steps_fitting", [1, 2, 5, T, 100])
def test_auto_chunk_is_the_largest_that_fits_the_budget(steps_fitting):
    (x, y), _ = _data()
    probe = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    one = _saved_per_step(probe, x[:1], y, 1)
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    budget = int(one * (steps_fitting + 0.5))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       chunk="auto", max_memory=budget)
    assert learner.chunk_size is None  # measured on the first batch
    backwards, _ = _count_backwards(model, learner, x, y)
    assert learner.chunk_size == steps_fitting  # what fits, whatever this batch's T
    chosen = min(steps_fitting, T)
    assert backwards == 1 + math.ceil(T / chosen)  # the measured (and undone) first step, then chunks
    backwards, _ = _count_backwards(model, learner, x, y)
    assert backwards == math.ceil(T / chosen)  # kept for later batches
    assert learner.state_dict()["chunk_size"] == steps_fitting


def test_auto_chunk_is_not_capped_by_a_short_first_batch():
    (x, y), _ = _data()
    probe = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    one = _saved_per_step(probe, x[:1], y, 1)
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       chunk="auto", max_memory=int(one * 4.5))
    learner.step(x[:1], y)  # a first batch of one step
    backwards, _ = _count_backwards(model, learner, x, y)
    assert learner.chunk_size == 4 and backwards == math.ceil(T / 4)


@pytest.mark.parametrize("dropout", [False, True])
def test_auto_chunk_trains_every_batch_as_that_chunk_does(dropout):
    """The measurement of the first step is undone (batch-norm statistics, gradients, neuron state, random
    state), so a multi-step conv-BN model, whose BN normalises each call's steps together, gets the same
    updates from chunk="auto" as from chunk= the size it finds, the first batch included."""
    from spikingjelly.activation_based import layer

    def build():
        torch.manual_seed(0)
        model = _sj_conv_no_bn("m")
        model.insert(1, layer.BatchNorm2d(model[0].out_channels, step_mode="m"))
        if dropout:
            model.insert(3, layer.Dropout(0.3, step_mode="m"))
        return model

    g = torch.Generator().manual_seed(4)
    batches = [(torch.rand(8, B, 1, 6, 6, generator=g) * 2, torch.randint(0, 5, (B,), generator=g)) for _ in range(3)]
    probe = build()
    one = _saved_per_step(probe, batches[0][0][:1], batches[0][1], 1)
    runs = {}
    for chunk in ("auto", 3):
        model = build()
        options = dict(chunk="auto", max_memory=int(one * 3.5)) if chunk == "auto" else dict(chunk=3)
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                           **options)
        torch.manual_seed(7)
        losses = [learner.step(x, y).loss for x, y in batches]
        runs[chunk] = (losses, {k: v.clone() for k, v in model.state_dict().items()}, learner.chunk_size)
        learner.unwrap()
    assert runs["auto"][2] == 3
    assert runs["auto"][0] == runs[3][0]
    for k, v in runs[3][1].items():
        assert torch.equal(runs["auto"][1][k], v), k


def test_auto_chunk_counts_spikes_as_the_packer_keeps_them():
    # chunk="auto" measures its first step through the spike packer (1-byte spikes, no membrane for
    # batch-norm-fed neurons), not beside it: a conv-BN-LIF model keeps well under half the bytes per step
    # that it keeps unpacked, and so gets a longer chunk from the same budget
    from test_norm_recompute import _data as conv_data, vgg_like

    x, y = conv_data(steps=6)
    measured = {}
    for options in ({}, dict(pack_spikes=False, recompute_membrane=False)):
        torch.manual_seed(0)
        model = vgg_like()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                           chunk="auto", max_memory=1 << 40, **options)
        learner.step(x, y)
        assert learner.packer is (None if options else learner.packer) and learner.step_bytes > 0
        measured[bool(options)] = learner.step_bytes
        learner.unwrap()
    assert measured[False] < 0.6 * measured[True], measured
    # and the same budget holds more packed steps
    budget = int(measured[True] * 2.5)
    chunks = {}
    for options in ({}, dict(pack_spikes=False, recompute_membrane=False)):
        torch.manual_seed(0)
        model = vgg_like()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                           chunk="auto", max_memory=budget, **options)
        learner.step(x, y)
        chunks[bool(options)] = learner.chunk_size
        learner.unwrap()
    assert chunks[True] == 2 and chunks[False] >= 4, chunks


def test_auto_chunk_trains_like_chunk_one():
    reference, _, _ = _train("sj-mlp-m", 1)
    build, _ = MODELS["sj-mlp-m"]
    torch.manual_seed(0)
    model = build()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
                       chunk="auto", max_memory=0.5, seed=11)
    for x, y in _data():
        learner.step(x, y)
    assert learner.chunk_size >= T  # a tiny MLP fits any machine's half
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_chunk_measurement_leaves_other_gradients_and_no_hooks_behind():
    """The measured first step is undone for every parameter (one trained by another optimizer too), and a
    batch that fails in the measurement leaves no hook on the model."""
    (x, y), _ = _data()
    grads = {}
    for options in (dict(chunk="auto", max_memory=10 ** 9), dict(chunk=T)):
        torch.manual_seed(0)
        model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1),
                           **options)  # the first layer is not the learner's to update
        learner.step(x, y)
        grads[options["chunk"]] = model[0].weight.grad.clone()
        learner.unwrap()
    assert torch.equal(grads["auto"], grads[T])
    model = nn.Sequential(*sj_mlp("LIFNode", step_mode="s", tau=2.0))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       chunk="auto", max_memory=10 ** 9)
    with pytest.raises(slr.LayoutError):
        learner.step(torch.rand(12, 12), torch.randint(0, 5, (12,)))  # [B, features]: no time dimension
    learner.unwrap()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_memory_budget_reads_bytes_and_fractions():
    assert memory_budget(12345, torch.device("cpu")) == 12345
    half = memory_budget(0.5, torch.device("cpu"))
    assert 0 < half == memory_budget(1.0, torch.device("cpu")) / 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk=0), "positive int"),
    (dict(chunk=-2), "positive int"),
    (dict(chunk=2.0), "positive int"),
    (dict(chunk=True), "positive int"),
    (dict(chunk="fast"), "positive int"),
    (dict(chunk="auto"), "needs max_memory"),
    (dict(chunk="auto", max_memory=0), "max_memory must be"),
    (dict(chunk="auto", max_memory=1.5), "fraction"),
    (dict(chunk="auto", max_memory="1GB"), "max_memory must be"),
    (dict(chunk=2, max_memory=10 ** 9), "budget of chunk='auto'"),
])
def test_bad_chunk_options_are_refused_without_touching_the_model(kwargs, match):
    from tests.conftest import assert_same_snapshot, snapshot

    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    before = snapshot(model)
    with pytest.raises(slr.WrapError, match=match):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert_same_snapshot(before, snapshot(model))


def test_chunk_needs_online_mode():
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    with pytest.raises(slr.WrapError, match="online mode"):
        slr.wrap(model, rule="sltt", chunk=2)


def test_checkpoint_keeps_the_chunk(tmp_path):
    model = sj_mlp("LIFNode", step_mode="m", tau=2.0)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       chunk="auto", max_memory=10 ** 9)
    (x, y), _ = _data()
    learner.step(x, y)
    learner.save(tmp_path / "c.pt")
    learner.unwrap()
    other = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     chunk="auto", max_memory=10 ** 9)
    other.load(tmp_path / "c.pt")
    assert other.chunk_size == learner.chunk_size >= T


def _nograd_call_lengths(device, model=None, **kwargs):
    model = (model if model is not None else sj_mlp("LIFNode", step_mode="m", tau=2.0)).to(device)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       K=2, sample="last", **kwargs)
    lengths = []
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, B, 12, generator=g).to(device), torch.randint(0, 5, (B,), generator=g).to(device)
    learner.step(x, y)  # the first batch also asks the model, once, whether it reduces its output over time
    handle = model.register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[0]) if not torch.is_grad_enabled() else None)
    learner.step(x, y)  # steps 0..9 forward only, 10 and 11 backpropagated
    handle.remove()
    return lengths


def test_sltt_k_forward_only_runs_in_calls_of_at_most_nograd_chunk_steps():
    assert _nograd_call_lengths("cpu") == [4, 4, 2]  # CPU default: at most 4 steps per call
    assert _nograd_call_lengths("cpu", nograd_chunk=10) == [10]
    assert _nograd_call_lengths("cpu", nograd_chunk=3) == [3, 3, 3, 1]


def _with_batch_norm(track_running_stats=True, norm_eval=False):
    from spikingjelly.activation_based import functional, layer, neuron

    # SeqToANNContainer: SpikingJelly 0.0.0.0.14's multi-step BatchNorm1d takes only [T, N, C, L]
    norm = layer.SeqToANNContainer(nn.BatchNorm1d(16, track_running_stats=track_running_stats))
    model = nn.Sequential(layer.Linear(12, 16), norm, neuron.LIFNode(tau=2.0), layer.Linear(16, 5))
    norm.train(not norm_eval)  # the norm alone: SpikingJelly 0.0.0.0.14's LIF passes no gradient in eval mode
    functional.set_step_mode(model, "m")
    return model


def test_sltt_k_forward_only_steps_of_a_batch_norm_model_follow_chunk():
    """A batch norm with batch statistics would normalise a multi-step call's steps together: by default
    the forward-only steps then run as the backpropagated ones do, ``chunk`` steps per call."""
    assert _nograd_call_lengths("cpu", _with_batch_norm()) == [1] * 10
    assert _nograd_call_lengths("cpu", _with_batch_norm(), chunk=3) == [3, 3, 3, 1]
    assert _nograd_call_lengths("cpu", _with_batch_norm(False, norm_eval=True)) == [1] * 10
    assert _nograd_call_lengths("cpu", _with_batch_norm(norm_eval=True)) == [4, 4, 2]  # running statistics
    assert _nograd_call_lengths("cpu", _with_batch_norm(), nograd_chunk=5) == [5, 5]  # asked for


def test_sltt_k_with_batch_norm_equals_a_per_step_reference():
    """SLTT-2 on a multi-step conv+BN model: gradients and running statistics as a hand-written loop that
    runs every step alone (forward-only ones under no_grad), membranes detached before each step."""
    from spikingjelly.activation_based import functional

    torch.manual_seed(6)
    model = sj_conv("m")
    reference = copy.deepcopy(model)
    x, y = (torch.rand(7, B, 2, 8, 8) < 0.4).float(), torch.randint(0, 5, (B,))
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0), K=2, seed=5)
    steps = learner.step(x, y).steps
    learner.unwrap()
    functional.reset_net(reference)
    lif = reference[2]
    for t in range(7):
        if isinstance(lif.v, torch.Tensor):
            lif.v = lif.v.detach()
        with torch.set_grad_enabled(t in steps):
            out = reference(x[t : t + 1])[0]
        if t in steps:
            (F.cross_entropy(out, y) / 7).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sltt_k_forward_only_is_one_call_per_run_on_cuda():
    assert _nograd_call_lengths("cuda") == [10]
