"""Spikes saved for backward as bool (pack_spikes): the same gradients bit for bit, a quarter of the bytes,
and never a tensor that is not known to be spikes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snn_localrules as slr
from snn_localrules.functional import spike_pack
from snn_localrules.functional.spike_pack import SpikePacker

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402

from tests.conftest import assert_same_snapshot, snapshot  # noqa: E402

T, B = 6, 4


def _lif():
    return neuron.LIFNode(tau=2.0, v_reset=None, detach_reset=True, surrogate_function=surrogate.Sigmoid())


def _conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif(),
        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif(),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 5),
    )
    functional.set_step_mode(model, "m")
    return model


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, 2, 8, 8, generator=g) < 0.3).float(), torch.randint(0, 5, (B,), generator=g)


def _zero_change_grads(model, x, y):
    out = model(x)
    loss = sum(F.cross_entropy(o, y) for o in out) / T
    loss.backward()
    functional.reset_net(model)
    return [p.grad.clone() for p in model.parameters()]


def test_zero_change_gradients_are_bit_identical_with_packing():
    x, y = _data()
    results = {}
    for pack in (False, True):
        model = _conv_model()
        learner = slr.wrap(model, rule="sltt", pack_spikes=pack)
        results[pack] = _zero_change_grads(model, x, y), learner.packer
        learner.unwrap()
    for a, b in zip(results[False][0], results[True][0]):
        assert torch.equal(a, b)
    assert results[False][1] is None
    packer = results[True][1]
    # both neuron layers' spikes were saved by the next layer (conv, max-pool), and the max-pooled spikes
    # by the linear readout: all packed 4:1
    assert packer.packed_bytes > 0 and packer.saved_bytes == 4 * packer.packed_bytes
    assert packer.packed_bytes == 2 * T * B * 8 * 8 * 8 + T * B * 8 * 4 * 4


def test_multi_level_spike_counts_are_not_packed_into_a_byte():
    """SpikingJelly's MultiLevelSpikeCount surrogate emits counts 0..K, not 0/1: its fused outputs are kept
    as they are (a byte would hold 8 x an 8x8 average pool's 64 cells = 512 wrapped to 0)."""
    if not hasattr(surrogate, "MultiLevelSpikeCount"):
        pytest.skip("this SpikingJelly has no MultiLevelSpikeCount")

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            layer.Conv2d(2, 4, 3, padding=1),
            neuron.LIFNode(tau=2.0, v_reset=None, surrogate_function=surrogate.MultiLevelSpikeCount(8)),
            layer.AvgPool2d(8), layer.Flatten(), layer.Linear(4, 5),
        ).double()
        functional.set_step_mode(model, "m")
        return model

    g = torch.Generator().manual_seed(1)
    x = torch.rand(T, B, 2, 8, 8, generator=g, dtype=torch.float64) * 60
    y = torch.randint(0, 5, (B,), generator=g)
    grads, counts = {}, {}
    for pack in (False, True):
        model = build()
        learner = slr.wrap(model, rule="sltt", pack_spikes=pack)
        counts[pack] = model[1](model[0](x)).max().item()
        functional.reset_net(model)
        grads[pack] = _zero_change_grads(model, x, y)
        assert learner.packer is None or learner.packer.packed_bytes == 0
        learner.unwrap()
    assert counts[True] > 1  # counts, not spikes (their 8x8 window sums pass 255)
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
    # a surrogate probed as a Heaviside (K=1) and then given another K is probed again
    model = build()
    model[1].surrogate_function.max_spike_count = 1
    learner = slr.wrap(model, rule="sltt")
    _zero_change_grads(model, x, y)
    assert learner.packer.packed_bytes > 0  # 0/1 spikes: packed
    model[1].surrogate_function.max_spike_count = 8
    learner.packer.packed_bytes = 0
    model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(_zero_change_grads(model, x, y), grads[False]))
    assert learner.packer.packed_bytes == 0
    learner.unwrap()


@pytest.mark.parametrize("chunk", [1, 3])
def test_online_training_is_bit_identical_with_packing(chunk):
    x, y = _data()
    params = {}
    for pack in (False, True):
        model = _conv_model()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           pack_spikes=pack, chunk=chunk)
        for seed in range(2):
            learner.step(*_data(seed))
        params[pack] = [p.detach().clone() for p in model.parameters()]
        if pack:
            assert learner.packer.packed_bytes > 0
    for a, b in zip(params[False], params[True]):
        assert torch.equal(a, b)


def _pooled_model(pool):
    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif(), pool,
        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), _lif(),
        layer.Flatten(), layer.Linear(8 * 4 * 4, 5),
    )
    functional.set_step_mode(model, "m")
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pool,packed_pool", [
    (lambda: layer.AvgPool2d(2), True),          # quarters: counts 0..4 over 4
    (lambda: layer.AvgPool2d((2, 4), stride=2, padding=(0, 1)), False),  # padding: not countable
    (lambda: layer.AvgPool2d(3, stride=2, padding=1), False),  # 9 values a window: not a power of two
    (lambda: layer.MaxPool2d(2), True),
])
def test_pooled_spikes_are_packed_exactly_when_countable(pool, packed_pool, dtype):
    x, y = _data()
    x = x.to(dtype)
    results = {}
    for pack in (False, True):
        model = _pooled_model(pool()).to(dtype)
        learner = slr.wrap(model, rule="sltt", pack_spikes=pack)
        results[pack] = _zero_change_grads(model, x, y), learner.packer
        learner.unwrap()
    for a, b in zip(results[False][0], results[True][0]):
        assert torch.equal(a, b)
    spikes = T * B * 8 * 8 * 8  # the first layer's spikes, saved by the pool (avg and max pools keep their input)
    pooled = T * B * 8 * 4 * 4  # saved by the second conv
    last = T * B * 8 * 4 * 4  # the second layer's spikes, saved by the linear readout
    assert results[True][1].packed_bytes == spikes + (pooled if packed_pool else 0) + last


def test_pooled_window_reads_the_pooling_layers():
    from snn_localrules.functional.spike_pack import pooled_window

    assert pooled_window(nn.AvgPool2d(2)) == ("avg", 4)
    assert pooled_window(nn.AvgPool2d((2, 4))) == ("avg", 8)
    assert pooled_window(nn.AvgPool1d(4)) == ("avg", 4)
    assert pooled_window(nn.AvgPool3d(2)) == ("avg", 8)
    assert pooled_window(nn.AvgPool2d(3)) is None
    assert pooled_window(nn.AvgPool2d(2, ceil_mode=True)) is None
    assert pooled_window(nn.AvgPool2d(2, divisor_override=3)) is None
    assert pooled_window(nn.AvgPool2d(16)) is None  # 256 values: counts past what bfloat16 holds exactly
    assert pooled_window(nn.MaxPool2d(3, stride=2, padding=1)) == ("max", 1)
    assert pooled_window(nn.MaxPool2d(2, return_indices=True)) is None
    assert pooled_window(nn.AdaptiveAvgPool2d(1)) is None


def test_part_of_a_larger_buffer_is_not_registered():
    packer = SpikePacker()
    with packer.activate():
        buffer = torch.rand(200)
        spikes = (buffer[:100] < 2).float()  # a fresh tensor: registered
        packer.register(spikes)
        assert packer._is_spikes(spikes)
        view = buffer[100:]
        view.copy_((view < 0.5).float())
        packer.register(view)  # binary, but the other half of its storage is not
        assert not packer._is_spikes(buffer)


def test_a_freed_spike_tensor_is_forgotten():
    packer = SpikePacker()
    with packer.activate():
        spikes = (torch.rand(1000) < 0.5).float()
        packer.register(spikes)
        assert packer._is_spikes(spikes) and packer._is_spikes(spikes.view(10, 100))
        address = spikes.untyped_storage().data_ptr()
        del spikes
        # whatever the allocator hands out next (often the same address), it is not taken for spikes
        other = torch.randn(1000)
        assert not packer._is_spikes(other), f"reused address {other.untyped_storage().data_ptr() == address}"
        assert not packer._is_spikes(torch.randn(1000))


def test_spikes_modified_in_place_are_not_packed():
    packer = SpikePacker()
    with packer.activate():
        spikes = (torch.rand(100) < 0.5).float()
        packer.register(spikes)
        spikes.mul_(0.5)  # no longer binary
        assert packer._pack(spikes) is spikes
        assert packer.packed_bytes == 0


def test_registration_outside_activation_and_other_dtypes_are_ignored():
    packer = SpikePacker()
    spikes = (torch.rand(10) < 0.5).float()
    packer.register(spikes)  # not active: nothing to pack into
    assert not packer._spikes
    with packer.activate():
        packer.register(torch.ones(3, dtype=torch.int64))
        assert not packer._spikes


def test_other_saved_tensor_hooks_take_precedence():
    x, y = _data()
    model = _conv_model()
    learner = slr.wrap(model, rule="sltt")
    seen = []

    def pack(tensor):
        seen.append(tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    loss = sum(F.cross_entropy(o, y) for o in out) / T
    loss.backward()
    assert learner.packer.packed_bytes == 0  # stood aside: the user's hooks saw every tensor
    assert torch.bool not in seen and seen
    learner.unwrap()


@pytest.fixture(params=["query", "probe"])
def hooks_query(request, monkeypatch):
    """Both ways of telling whether other saved-tensor hooks are active: torch's query (2.11 has it), and
    the probe that older releases (2.6) get, here by removing the query."""
    if request.param == "probe":
        monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks", raising=False)
    elif not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
        pytest.skip("this torch has no query of the active saved-tensor hooks")
    return request.param


def test_other_hooks_are_seen_with_or_without_torchs_query(hooks_query):
    assert not spike_pack._other_hooks_active()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        assert spike_pack._other_hooks_active()
        with torch.no_grad():
            assert spike_pack._other_hooks_active()
    assert not spike_pack._other_hooks_active()
    with torch.autograd.graph.save_on_cpu():
        assert spike_pack._other_hooks_active()
    with torch.inference_mode():
        assert spike_pack._other_hooks_active() is (hooks_query == "probe")  # no graph to probe: no packing
    assert not spike_pack._other_hooks_active()
    assert len(seen) == (2 if hooks_query == "probe" else 0)  # the probe's 0-d tensor, nothing else


def test_packing_needs_no_query_of_the_active_hooks(hooks_query):
    x, y = _data()
    results = {}
    for pack in (False, True):
        model = _conv_model()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), pack_spikes=pack)
        learner.step(x, y)
        results[pack] = [p.detach().clone() for p in model.parameters()], learner.packer
        learner.unwrap()
    assert results[True][1].packed_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(results[False][0], results[True][0]))


def test_disabled_saved_tensor_hooks_train_unpacked():
    # pushing hooks while they are disabled raises: the packer stands aside instead
    x, y = _data()
    model = _conv_model()
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.autograd.graph.disable_saved_tensors_hooks("no saved-tensor hooks here"):
        learner.step(x, y)
        out = model(x)  # and zero-change style calls of the wrapped model
    assert learner.packer.packed_bytes == 0 and out.shape == (T, B, 5)
    learner.step(x, y)
    assert learner.packer.packed_bytes > 0
    learner.unwrap()


def test_hooks_are_popped_when_the_forward_raises():
    model = _conv_model()
    learner = slr.wrap(model, rule="sltt")
    bad = torch.rand(T, B, 3, 8, 8)  # 3 channels into a 2-channel conv
    with pytest.raises(RuntimeError):
        model(bad)
    assert not spike_pack._other_hooks_active()
    assert learner.packer._depth == 0
    functional.reset_net(model)
    learner.unwrap()


def test_unwrap_removes_the_packing_hooks_and_bad_option_is_refused():
    model = _conv_model()
    before = snapshot(model)
    learner = slr.wrap(model, rule="sltt")
    learner.unwrap()
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(slr.WrapError, match="pack_spikes"):
        slr.wrap(model, rule="sltt", pack_spikes="yes")
    assert_same_snapshot(before, snapshot(model))
