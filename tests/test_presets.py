"""Model and rule presets: shapes in both frameworks, parameter counts, weight standardization, errors,
and one online training step through slr.wrap."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from snn_localrules import presets
from snn_localrules.presets.vgg9 import VGG9_CHANNELS, WSConv2d

FRAMEWORKS = ["spikingjelly", "snntorch"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def reset(model, framework):
    if framework == "spikingjelly":
        from spikingjelly.activation_based import functional

        functional.reset_net(model)
    else:
        from snntorch import utils

        utils.reset(model)


def run_seq(model, x_seq, framework):
    """[T, B, ...] -> [T, B, C] in either framework's idiom."""
    reset(model, framework)
    if framework == "spikingjelly":
        return model(x_seq)
    outs = []
    for x in x_seq:
        out = model(x)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.stack(outs)


def vgg9_formula(in_channels, num_classes, width):
    chans = [in_channels] + [max(1, int(round(c * width))) for c in VGG9_CHANNELS]
    convs = sum(a * b * 9 for a, b in zip(chans[:-1], chans[1:]))
    return convs + chans[-1] * 4 * num_classes + num_classes


# -- import time ------------------------------------------------------------------------------------------
def test_presets_import_without_frameworks():
    code = (
        "import sys\n"
        "sys.modules['spikingjelly'] = None; sys.modules['snntorch'] = None\n"
        "import snn_localrules.presets as P\n"
        "for fw, extra in (('spikingjelly', '[spikingjelly]'), ('snntorch', '[snntorch]')):\n"
        "    try:\n"
        "        P.vgg9(framework=fw)\n"
        "    except ImportError as e:\n"
        "        assert 'pip install snn-localrules' + extra in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no ImportError for ' + fw)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


# -- VGG-9 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_vgg9_forward_shapes(framework):
    model = presets.vgg9(in_channels=2, num_classes=11, width=0.125, framework=framework)
    x_seq = torch.rand(3, 2, 2, 32, 32)
    if framework == "snntorch":
        assert model(x_seq[0]).shape == (2, 11)  # single step
    out = run_seq(model, x_seq, framework)
    assert out.shape == (3, 2, 11)
    assert torch.isfinite(out).all()


def test_vgg9_spikingjelly_single_step_mode():
    model = presets.vgg9(width=0.125, step_mode="s", input_size=16)
    assert all(getattr(m, "step_mode", "s") == "s" for m in model.modules())
    assert model(torch.rand(2, 2, 16, 16)).shape == (2, 10)


def test_vgg9_structure():
    from spikingjelly.activation_based import neuron, surrogate

    model = presets.vgg9(width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    lifs = [m for m in model.modules() if isinstance(m, neuron.LIFNode)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 8 and len(lifs) == 8 and len(pools) == 3
    assert all(isinstance(c, WSConv2d) and c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert all(c.padding == (1, 1) and c.gain == 1.8 for c in convs)
    lif = lifs[0]
    assert lif.tau == 2.0 and lif.v_reset is None and lif.decay_input is False and lif.detach_reset is True
    assert isinstance(lif.surrogate_function, surrogate.ATan) and lif.step_mode == "m"
    readout = list(model.children())[-1]
    assert isinstance(readout, nn.Linear) and readout.bias is not None and readout.in_features == 128 * 4


def test_vgg9_snntorch_neurons():
    import snntorch as snn

    model = presets.vgg9(width=0.125, framework="snntorch", tau=4.0)
    leaky = [m for m in model.modules() if isinstance(m, snn.Leaky)]
    assert len(leaky) == 8
    assert all(m.init_hidden for m in leaky)
    assert float(leaky[0].beta) == pytest.approx(0.75)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_vgg9_parameter_count(framework, width):
    model = presets.vgg9(in_channels=2, num_classes=10, width=width, framework=framework)
    expected = vgg9_formula(2, 10, width)
    assert n_params(model) == expected == presets.vgg9_num_parameters(2, 10, width)
    if width == 1.0:
        readout = list(model.children())[-1]
        assert readout.in_features == 2048
        # 8 convs (1152 + 73728 + 294912 + 589824 + 1179648 + 2359296*3) + 2048*10 + 10
        assert expected == 9_217_152 + 20_490


def test_vgg9_width_scaling():
    assert presets.vgg9_channels(0.5) == [32, 64, 128, 128, 256, 256, 256, 256]
    assert presets.vgg9_channels(0.001) == [1] * 8
    model = presets.vgg9(width=0.5, framework="snntorch")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128, 256, 256, 256, 256]
    assert list(model.children())[-1].in_features == 256 * 4


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_vgg9_weights_standardized(framework):
    model = presets.vgg9(width=0.25, framework=framework)
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert len(convs) == 8
    for conv in convs:
        with torch.no_grad():
            conv.weight.mul_(3.0).add_(0.5)  # any raw scale/offset is standardized away
        w = conv.standardized_weight().flatten(1)
        assert torch.allclose(w.mean(1), torch.zeros(w.shape[0]), atol=1e-5)
        # scaled WS (the TP authors' code): std gain / sqrt(fan_in), so unit currents do not grow with width
        expected = 1.8 / math.sqrt(w.shape[1])
        assert torch.allclose(w.std(1, unbiased=False), torch.full((w.shape[0],), expected), rtol=1e-3)
        conv.fan_in_scale = False
        w = conv.standardized_weight().flatten(1)
        assert torch.allclose(w.std(1, unbiased=False), torch.full((w.shape[0],), 1.8), atol=1e-3)


def test_ws_conv_uses_standardized_weight():
    conv = WSConv2d(3, 4, 3, padding=1, gain=1.8)
    x = torch.randn(2, 3, 8, 8)
    expected = torch.nn.functional.conv2d(x, conv.standardized_weight(), None, padding=1)
    assert torch.allclose(conv(x), expected)
    assert not torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, None, padding=1))


def test_vgg9_spikingjelly_conv_follows_set_step_mode():
    from spikingjelly.activation_based import functional

    model = presets.vgg9(width=0.125, input_size=16)
    functional.set_step_mode(model, "s")
    assert model(torch.rand(2, 2, 16, 16)).shape == (2, 10)
    functional.reset_net(model)
    functional.set_step_mode(model, "m")
    assert model(torch.rand(3, 2, 2, 16, 16)).shape == (3, 2, 10)


def test_vgg9_custom_neuron_and_kwargs():
    from functools import partial

    from spikingjelly.activation_based import neuron

    model = presets.vgg9(width=0.125, neuron=partial(neuron.IFNode, detach_reset=True))
    ifs = [m for m in model.modules() if isinstance(m, neuron.IFNode)]
    assert len(ifs) == 8 and all(m.step_mode == "m" for m in ifs)
    model = presets.vgg9(width=0.125, neuron_kwargs=presets.sltt_neuron_kwargs())
    lif = next(m for m in model.modules() if isinstance(m, neuron.LIFNode))
    assert lif.tau == pytest.approx(1.1) and lif.v_threshold == 1.0 and lif.v_reset is None
    model = presets.vgg9(width=0.125, framework="snntorch", neuron_kwargs=presets.sltt_neuron_kwargs("snntorch"))
    assert model(torch.rand(1, 2, 32, 32)).shape == (1, 10)


# -- MLPs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("spiking_output", [False, True])
def test_mlp_nmnist(framework, spiking_output):
    model = presets.mlp_nmnist(framework=framework, spiking_output=spiking_output)
    assert n_params(model) == 2312 * 200 + 200 + 200 * 10 + 10
    out = run_seq(model, torch.rand(4, 3, 2, 34, 34), framework)
    assert out.shape == (4, 3, 10)
    if spiking_output:
        assert set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("recurrent", [False, True])
def test_mlp_shd(framework, recurrent):
    model = presets.mlp_shd(recurrent=recurrent, framework=framework)
    out = run_seq(model, (torch.rand(5, 2, 700) < 0.3).float(), framework)
    assert out.shape == (5, 2, 20) and torch.isfinite(out).all()
    feed_forward = 700 * 450 + 450 + 450 * 20 + 20
    if not recurrent:
        assert n_params(model) == feed_forward
    elif framework == "snntorch":
        import snntorch as snn

        assert any(isinstance(m, snn.RLeaky) for m in model.modules())
        assert n_params(model) == feed_forward + 450 * 450 + 450
    else:
        from spikingjelly.activation_based import layer

        container = next(m for m in model.modules() if isinstance(m, layer.LinearRecurrentContainer))
        assert container.sub_module.step_mode == "s"
        assert n_params(model) == feed_forward + 450 * 450  # R alone: the input passes unchanged
        xs = torch.rand(3, 900)
        torch.testing.assert_close(container.rc(xs), xs[:, :450] + xs[:, 450:] @ container.rc.weight.t())


def test_mlp_shd_recurrence_matters():
    torch.manual_seed(0)
    model = presets.mlp_shd(recurrent=True, hidden=16, in_features=8, num_classes=3)
    x_seq = (torch.rand(6, 2, 8) < 0.5).float() * 3
    out = run_seq(model, x_seq, "spikingjelly")
    container = model[1]
    with torch.no_grad():
        container.rc.weight.zero_()
    assert not torch.allclose(out, run_seq(model, x_seq, "spikingjelly"))


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda fw: presets.vgg9(framework=fw),
        lambda fw: presets.mlp_nmnist(framework=fw),
        lambda fw: presets.mlp_shd(framework=fw),
    ],
)
@pytest.mark.parametrize("bad", ["pytorch", "", None, "snn_torch"])
def test_bad_framework(build, bad):
    with pytest.raises(ValueError, match="spikingjelly.*snntorch"):
        build(bad)


def test_framework_name_case_insensitive():
    assert presets.mlp_nmnist(framework="SnnTorch", hidden=4)[1].out_features == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="step_mode"):
        presets.vgg9(step_mode="multi")
    with pytest.raises(ValueError, match="width"):
        presets.vgg9(width=0)
    with pytest.raises(ValueError, match="input_size"):
        presets.vgg9(input_size=4)
    with pytest.raises(ValueError, match="tau"):
        presets.mlp_shd(tau=0.5)
    with pytest.raises(TypeError, match="neuron"):
        presets.mlp_nmnist(neuron="LIFNode")


# -- rule settings -----------------------------------------------------------------------------------------
def test_sltt_options():
    # the losses of the authors' run commands: all-ones MSE target by default, one-hot for DVS-CIFAR10
    assert presets.sltt_options("dvs-gesture") == {"loss": "ce+mse", "T": 20, "K": 4}
    assert presets.sltt_options("DVS_CIFAR10") == {"loss": "ce+mse_onehot", "T": 10, "K": 2}
    assert presets.sltt_options("cifar100") == {"loss": "ce+mse", "T": 6}
    assert presets.sltt_options("cifar10dvs") == presets.sltt_options("dvs-cifar10")
    assert presets.sltt_options("ImageNet") == {"loss": "ce", "T": 6, "K": 2}
    assert presets.sltt_options("imagenet", sltt_k=False) == {"loss": "ce", "T": 6}
    assert "K" not in presets.sltt_options("cifar10")
    with pytest.raises(ValueError, match="dvs-gesture.*imagenet"):
        presets.sltt_options("mnist")


def test_sltt_neuron_kwargs():
    sj = presets.sltt_neuron_kwargs()
    assert sj["tau"] == 1.1 and sj["v_threshold"] == 1.0 and sj["v_reset"] is None
    assert type(sj["surrogate_function"]).__name__ == "PiecewiseQuadratic"  # the authors' "triangle"
    st = presets.sltt_neuron_kwargs("snntorch")
    assert st["beta"] == pytest.approx(1 - 1 / 1.1) and st["reset_mechanism"] == "subtract"
    with pytest.raises(ValueError):
        presets.sltt_neuron_kwargs("jax")


def test_tp_options():
    assert presets.tp_options("dvs-gesture")["num_classes"] == 11
    assert presets.tp_options("shd") == {"num_classes": 20, "trace_decay": 0.8}
    assert presets.tp_options("nmnist", seed=3)["seed"] == 3
    assert all(0 <= presets.tp_options(d)["trace_decay"] < 1 for d in ("dvs-gesture", "dvs-cifar10"))
    with pytest.raises(ValueError, match="known datasets"):
        presets.tp_options("imagenet")


# -- one training step through the library ---------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_vgg9_sltt_training_step(framework):
    slr = pytest.importorskip("snn_localrules")
    torch.manual_seed(0)
    model = presets.vgg9(in_channels=2, num_classes=10, width=0.125, framework=framework)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    x_seq = torch.rand(2, 2, 2, 32, 32) * 2
    y = torch.tensor([1, 3])
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    try:
        stats = learner.step(x_seq, y)
    finally:
        learner.unwrap()
    assert stats.T == 2 and stats.output_counts.shape == (2, 10)
    assert torch.isfinite(torch.tensor(stats.loss))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # at least the readout moved


def test_mlp_nmnist_sltt_options_step():
    slr = pytest.importorskip("snn_localrules")
    model = presets.mlp_nmnist(framework="snntorch", hidden=16)
    opts = presets.sltt_options("dvs-cifar10")
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.01), **opts)
    try:
        stats = learner.step(torch.rand(10, 2, 2, 34, 34), torch.tensor([0, 1]))
    finally:
        learner.unwrap()
    assert len(stats.steps) == 2 and stats.T == 10


@pytest.mark.parametrize(
    "framework",
    [
        "spikingjelly",
        "snntorch",
    ],
)
def test_mlp_shd_recurrent_sltt_step(framework):
    slr = pytest.importorskip("snn_localrules")
    model = presets.mlp_shd(recurrent=True, framework=framework, hidden=16)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    try:
        stats = learner.step(torch.rand(3, 2, 700), torch.tensor([0, 1]))
    finally:
        learner.unwrap()
    assert stats.T == 3


@pytest.mark.parametrize("framework", ["spikingjelly", "snntorch"])
@pytest.mark.parametrize("label_batch", ["concat", "separate"])
def test_mlp_shd_recurrent_tp_step(framework, label_batch):
    """TP on the recurrent SHD MLP: SpikingJelly's hidden LIF runs single-step inside a multi-step
    LinearRecurrentContainer, so its output hook must not take a time dimension it does not have (it took
    the first sample as the first step and the readout got [1, 1, 20])."""
    pytest.importorskip(framework)
    slr = pytest.importorskip("snn_localrules")
    model = presets.mlp_shd(recurrent=True, framework=framework, hidden=16)
    learner = slr.wrap(model, rule="tp", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=20,
                       label_batch=label_batch)
    x, y = torch.rand(3, 4, 700) * 2, torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    try:
        stats = learner.step(x, y)
        assert stats.prediction.shape == (4,) and learner.predict(x).shape == (4,)
    finally:
        learner.unwrap()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
