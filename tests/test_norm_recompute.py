"""A fused SLTT neuron fed by a batch norm keeps no membrane (snn_localrules.functional.norm_recompute).

* Backward: with the membrane rebuilt from the batch norm's input, the gradients of the norm's input, weight
  and bias and of PLIF's ``w`` equal (1e-5 relative) those of plain autograd through the same batch norm and
  the per-step SLTT reference of test_sltt_multistep (membrane detached before every step), for every
  neuron x reset x decay_input x detach_reset, batch statistics and running statistics, with and without
  affine parameters, the surrogate's closed-form derivative (in-place path) and autograd of it, with and
  without losses on the membrane outputs.
* Memory: wrapped, the node keeps exactly its ``[T, N]`` membrane less per batch-norm-fed neuron (and
  PLIF's input: it is rebuilt too; measured with saved-tensor hooks) and no spikes of its own (packed
  once, shared with the next layer).
* Only when it is sure: an in-place change between the norm and the neuron, a norm that does not feed the
  neuron directly, half precision, ``SyncBatchNorm`` and norms whose forward is not the plain formula keep the
  membrane as before; ``recompute_membrane=False`` turns it off; gradients are right either way.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional, layer, surrogate  # noqa: E402

import snn_localrules as slr  # noqa: E402
from snn_localrules.adapters.spikingjelly import surrogate_derivative  # noqa: E402
from snn_localrules.functional.norm_recompute import NormSources, channel_dim, rebuild_input_from  # noqa: E402
from snn_localrules.memory import SavedBytes, storage_keys  # noqa: E402
from test_sltt_multistep import (  # noqa: E402
    CONFIGS, _assert_rel_close, _config_id, _spike_rate_ok, fused, plif_w, reference_sltt,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

T, B, C, L = 5, 3, 4, 6
NORMS = ("batch", "running", "no_affine")


def _norm(kind: str, dtype) -> nn.Module:
    """SpikingJelly's multi-step BatchNorm1d over [T, B, C, L], affine parameters away from (1, 0)."""
    bn = layer.BatchNorm1d(C, affine=kind != "no_affine", step_mode="m").to(dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.rand(C, generator=g, dtype=torch.float64) * 0.6 + 0.4)
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 0.3)
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    if kind != "batch":
        # frozen statistics, as in fine-tuning; the neuron still trains. Without affine parameters the
        # statistics shift the output up, or a LIF would hardly fire on unit-variance input
        bn.eval()
    if kind == "no_affine":
        with torch.no_grad():
            bn.running_mean.fill_(-0.6)
            bn.running_var.fill_(0.8)
    return bn


def _conv_output(dtype, seed=0, steps=T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(steps, B, C, L, generator=g, dtype=torch.float64) * 1.3 + 0.4).to(dtype)


def _run(kind, cfg_rest, norm_kind, dtype, sg, derivative, rebuild, use_v_outputs, w0, steps=T, kept=None):
    """Gradients of the norm's input, weight, bias and of w, through norm -> neuron; ``rebuild``: the fused
    node with the norm as its source, else the per-step reference. ``kept``: a list that gets the shapes of
    the tensors the fused node saved."""
    decay, v_reset, detach = cfg_rest
    bn = _norm(norm_kind, dtype)
    x = _conv_output(dtype, steps=steps).requires_grad_(True)
    w = w0.detach().clone().requires_grad_(True) if w0 is not None else None
    v0 = 0.0
    if rebuild:
        norms = NormSources()
        handle = bn.register_forward_hook(norms.record)
        norms.enter()
        try:
            y = bn(x)
            source = norms.source_of(y)
            assert source is not None
            with rebuild_input_from(y, source):
                spikes, v, v_seq = fused(kind, y, v0, decay, v_reset, detach, sg, w=w, store_v_seq=True,
                                         derivative=derivative)
        finally:
            norms.exit()
            handle.remove()
        assert spikes.grad_fn.norm is not None, "the node kept its membrane"
        if kept is not None:
            kept.extend(tuple(t.shape) for t in spikes.grad_fn.saved_tensors if t is not None)
    else:
        y = bn(x)
        spikes, v, v_seq = reference_sltt(kind, y, torch.zeros_like(y[0]), decay, v_reset, detach, sg, w=w)
    g = torch.Generator().manual_seed(3)
    loss = (spikes * torch.randn(spikes.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if use_v_outputs:
        loss = loss + (v_seq * torch.randn(v_seq.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
        loss = loss + (v * torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    loss.backward()
    grads = {"input": x.grad}
    if bn.affine:
        grads.update(weight=bn.weight.grad, bias=bn.bias.grad)
    if w is not None:
        grads["w"] = w.grad.reshape(1)
    return spikes.detach(), grads


@pytest.mark.parametrize("dtype,use_v_outputs,closed_form", [
    (torch.float32, False, True), (torch.float64, True, True), (torch.float64, False, False)],
    ids=["fp32-spikes-closed", "fp64-spikes+v-closed", "fp64-spikes-autograd"])
@pytest.mark.parametrize("norm_kind", NORMS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_rebuilt_membrane_gradients_equal_the_reference(cfg, norm_kind, dtype, use_v_outputs, closed_form):
    kind, v_reset, decay, detach = cfg
    sg = surrogate.Sigmoid(alpha=4.0)
    derivative = surrogate_derivative(sg) if closed_form else None
    w0 = plif_w(dtype) if kind == "plif" else None
    args = (kind, (decay, v_reset, detach), norm_kind, dtype, sg, derivative)
    ref_spikes, ref = _run(*args, rebuild=False, use_v_outputs=use_v_outputs, w0=w0)
    spikes, got = _run(*args, rebuild=True, use_v_outputs=use_v_outputs, w0=w0)
    _spike_rate_ok(ref_spikes)
    assert torch.equal(spikes, ref_spikes)
    assert got.keys() == ref.keys()
    for name in ref:
        _assert_rel_close(got[name], ref[name], name)


@pytest.mark.parametrize("use_v_outputs", [False, True], ids=["spikes", "spikes+v"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_one_rebuilt_step_keeps_spikes_only_for_a_hard_reset(cfg, use_v_outputs):
    # chunk 1 of online SLTT: one step per call. Charging one step again needs no reset, so a soft reset's
    # node keeps no spikes (its backward never reads them); a hard reset's route to V reads them
    kind, v_reset, decay, detach = cfg
    sg = surrogate.Sigmoid(alpha=4.0)
    w0 = plif_w(torch.float64) if kind == "plif" else None
    args = (kind, (decay, v_reset, detach), "batch", torch.float64, sg, surrogate_derivative(sg))
    ref_spikes, ref = _run(*args, rebuild=False, use_v_outputs=use_v_outputs, w0=w0, steps=1)
    kept = []
    spikes, got = _run(*args, rebuild=True, use_v_outputs=use_v_outputs, w0=w0, steps=1, kept=kept)
    assert torch.equal(spikes, ref_spikes) and 0 < float(spikes.mean()) < 1
    for name in ref:
        if name == "w" and not decay and not bool(ref["w"].any()):
            # without decay_input dH/dk is -(V[-1] - V_reset), and the first step's V[-1] is V_reset here
            assert torch.equal(got["w"], ref["w"])
        else:
            _assert_rel_close(got[name], ref[name], name)
    # the norm's input, and the spikes for a hard reset
    assert kept.count((1, B, C, L)) == (1 if v_reset is None else 2)


def test_channel_dim_accepts_only_the_plain_batch_norm_formula():
    assert channel_dim(nn.BatchNorm2d(3)) == 1
    assert channel_dim(nn.BatchNorm1d(3)) == 1
    assert channel_dim(layer.BatchNorm2d(3, step_mode="m")) == 2
    assert channel_dim(layer.BatchNorm2d(3, step_mode="s")) == 1

    class Renamed(nn.BatchNorm2d):  # a subclass that keeps the forward
        pass

    class Scaled(nn.BatchNorm2d):  # one that changes it
        def forward(self, x):
            return super().forward(x) * 2.0

    assert channel_dim(Renamed(3)) == 1
    assert channel_dim(Scaled(3)) is None
    assert channel_dim(nn.SyncBatchNorm(3)) is None  # statistics over processes
    assert channel_dim(nn.LayerNorm(3)) is None
    threshold_bn = getattr(layer, "ThresholdDependentBatchNorm2d", None)
    if threshold_bn is not None:
        assert channel_dim(threshold_bn(alpha=1.0, v_th=1.0, num_features=3)) is None


# ------------------------------------------------------------------------------------------------------
# wrapped models
# ------------------------------------------------------------------------------------------------------
class InPlaceShift(nn.Module):
    """Modifies its input in place: the batch norm's output is no longer what the norm rebuilds."""

    def forward(self, x):
        return x.add_(0.25)


def vgg_like(between=None):
    torch.manual_seed(0)
    blocks = [layer.Conv2d(2, 6, 3, padding=1, bias=False), layer.BatchNorm2d(6)]
    if between is not None:
        blocks.append(between)
    blocks += [
        sj_neuron.LIFNode(tau=2.0, v_reset=None, detach_reset=True, surrogate_function=surrogate.Sigmoid()),
        layer.Conv2d(6, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
        sj_neuron.ParametricLIFNode(init_tau=1.5, surrogate_function=surrogate.ATan()),
        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(8 * 4 * 4, 12),
        sj_neuron.IFNode(surrogate_function=surrogate.Sigmoid()), layer.Linear(12, 5),
    ]
    model = nn.Sequential(*blocks)
    functional.set_step_mode(model, "m")
    return model


def _data(seed=0, steps=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(steps, 4, 2, 8, 8, generator=g) * 1.5, torch.randint(0, 5, (4,), generator=g)


def _train_grads(model, x, y, **options):
    learner = slr.wrap(model, rule="sltt", **options)
    nodes = []
    try:
        out = model(x)
        stack = [out.grad_fn]
        while stack:  # the fused nodes of this graph, to see which kept their membrane
            node = stack.pop()
            if node is None or node in nodes:
                continue
            nodes.append(node)
            stack.extend(n for n, _ in node.next_functions)
        loss = sum(F.cross_entropy(o, y) for o in out) / x.shape[0]
        loss.backward()
    finally:
        functional.reset_net(model)
        learner.unwrap()
    fused_nodes = [n for n in nodes if type(n).__name__ == "SLTTMultiStepBackward"]
    return {n: p.grad.clone() for n, p in model.named_parameters()}, [n.norm is not None for n in fused_nodes]


def test_wrapped_gradients_equal_with_recompute_on_and_off():
    x, y = _data()
    model = vgg_like()
    twin, stepped = copy.deepcopy(model), copy.deepcopy(model)
    on, rebuilt_on = _train_grads(model, x, y)
    off, rebuilt_off = _train_grads(twin, x, y, recompute_membrane=False)
    ref, _ = _train_grads(stepped, x, y, fused=False)
    # the LIF and the PLIF are fed by batch norms; the IF after the linear layer keeps its membrane
    assert sorted(rebuilt_on) == [False, True, True] and rebuilt_off == [False] * 3
    assert float(ref["5.w"].abs()) > 0
    for name in ref:
        torch.testing.assert_close(on[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(off[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_keeps_exactly_one_membrane_less_per_norm_fed_neuron():
    """Measured with saved-tensor hooks (spike packing stands aside under them, so the spikes count in the
    model's dtype in both runs, and the rebuild's own spikes share the next layer's storage)."""
    x, y = _data(steps=4)
    saved = {}
    for recompute in (True, False):
        model = vgg_like()
        learner = slr.wrap(model, rule="sltt", recompute_membrane=recompute)
        exclude = storage_keys(list(model.parameters()) + list(model.buffers()) + [x])
        with SavedBytes(exclude) as counter:
            out = model(x)
        saved[recompute] = counter.total
        del out
        functional.reset_net(model)
        learner.unwrap()
    # T x B x (C x H x W) fp32: the LIF's membrane; the PLIF's membrane and its input (for d H / d w; with
    # recompute_membrane=False it keeps both, so that its backward has no time loop)
    kept = 4 * 4 * (6 * 8 * 8) * 4 + 2 * 4 * 4 * (8 * 8 * 8) * 4
    assert saved[False] - saved[True] == kept


def test_spikes_of_a_rebuilt_neuron_are_packed_once():
    x, y = _data()
    packed = {}
    for recompute in (True, False):
        model = vgg_like()
        learner = slr.wrap(model, rule="sltt", recompute_membrane=recompute)
        out = model(x)
        packed[recompute] = learner.packer.packed_bytes
        out.sum().backward()
        functional.reset_net(model)
        learner.unwrap()
    assert packed[True] == packed[False] > 0


@pytest.mark.parametrize("between", ["in_place", "dropout", "none"])
def test_only_a_norm_feeding_the_neuron_unchanged_is_rebuilt(between):
    module = {"in_place": InPlaceShift(), "dropout": layer.Dropout(0.2, step_mode="m"), "none": None}[between]
    x, y = _data()
    model = vgg_like(module)
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    on, rebuilt = _train_grads(model, x, y)
    torch.manual_seed(5)  # the same dropout mask
    ref, _ = _train_grads(twin, x, y, fused=False)
    assert sum(rebuilt) == (2 if between == "none" else 1)
    for name in ref:
        torch.testing.assert_close(on[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_half_precision_keeps_the_membrane():
    x, y = _data()
    model = vgg_like().to(torch.bfloat16)
    _, rebuilt = _train_grads(model, x.to(torch.bfloat16), y)
    assert rebuilt and not any(rebuilt)


def test_recompute_option_is_validated():
    with pytest.raises(slr.WrapError, match="recompute_membrane"):
        slr.wrap(vgg_like(), rule="sltt", recompute_membrane="yes")



def test_a_learning_plif_keeps_its_input_alone_unless_recompute_is_off():
    # Linear -> PLIF (decay_input, w learns) -> Linear: the PLIF keeps its input for d H / d w; with
    # recompute_membrane (default) not its membrane beside it (backward charges again), without it both.
    # The gradients are the same either way.
    T_, B_, N_ = 5, 3, 16

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(layer.Linear(8, N_), sj_neuron.ParametricLIFNode(init_tau=2.0, detach_reset=True),
                            layer.Linear(N_, 4))
        functional.set_step_mode(net, "m")
        return net

    x = torch.rand(T_, B_, 8, generator=torch.Generator().manual_seed(1))
    saved, grads = {}, {}
    for recompute in (True, False):
        net = model()
        learner = slr.wrap(net, rule="sltt", recompute_membrane=recompute)
        exclude = storage_keys(list(net.parameters()) + [x])
        with SavedBytes(exclude) as counter:
            out = net(x)
        saved[recompute] = counter.total
        out.square().sum().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in net.named_parameters()}
        functional.reset_net(net)
        learner.unwrap()
    assert saved[False] - saved[True] == T_ * B_ * N_ * 4  # the PLIF's membrane, fp32
    assert float(grads[True]["1.w"].abs()) > 0
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-6, atol=1e-9, msg=name)
