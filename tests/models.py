"""Small models in the frameworks' own idioms, shared by the tests."""
import torch
import torch.nn as nn


def sj_mlp(node="LIFNode", step_mode="s", **node_kwargs):
    from spikingjelly.activation_based import functional, layer, neuron

    cls = getattr(neuron, node)
    model = nn.Sequential(
        layer.Linear(12, 16), cls(**node_kwargs), layer.Linear(16, 5), cls(**node_kwargs)
    )
    functional.set_step_mode(model, step_mode)
    return model


def sj_lif_passes_gradient_in_eval_mode() -> bool:
    """False for SpikingJelly 0.0.0.0.14, whose IF and LIF neurons spike through a Heaviside without
    surrogate in eval mode."""
    from spikingjelly.activation_based import neuron

    node = neuron.LIFNode(v_threshold=0.5).eval()
    return node(torch.ones(3, requires_grad=True)).requires_grad


def sj_conv(step_mode="m"):
    from spikingjelly.activation_based import functional, layer, neuron

    model = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False),
        layer.BatchNorm2d(4),
        neuron.LIFNode(tau=2.0, detach_reset=True),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(4 * 4 * 4, 5),
    )
    functional.set_step_mode(model, step_mode)
    return model


def snn_sequential(neuron="Leaky"):
    import snntorch as snn

    cls = getattr(snn, neuron)
    kwargs = dict(beta=0.8) if neuron == "Leaky" else dict(alpha=0.7, beta=0.8)
    return nn.Sequential(
        nn.Linear(12, 16), cls(init_hidden=True, **kwargs), nn.Linear(16, 5), cls(init_hidden=True, output=True, **kwargs)
    )


class TutorialNet(nn.Module):
    """snnTorch tutorial style: init_hidden=False, forward owns the time loop and passes mem."""

    def __init__(self, beta=0.8):
        super().__init__()
        import snntorch as snn

        self.fc1, self.lif1 = nn.Linear(12, 16), snn.Leaky(beta=beta)
        self.fc2, self.lif2 = nn.Linear(16, 5), snn.Leaky(beta=beta)

    def forward(self, x_seq):
        mem1, mem2 = self.lif1.reset_mem(), self.lif2.reset_mem()
        spikes = []
        for x in x_seq:
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
        return torch.stack(spikes)


class ATanSpike(torch.autograd.Function):
    """Heaviside spike with the arctan surrogate (alpha=2, as SpikingJelly's and snnTorch's ATan),
    written here so that references depend on no framework: d/dx = 1 / (1 + (pi x)^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 + (torch.pi * x) ** 2)


class LoopsOverTime(nn.Module):
    """A forward that steps through the first dimension of its input itself, calling ``net`` (whose neurons
    keep their state, init_hidden=True) once per step: what multi_step=True is for."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_seq):
        return torch.stack([self.net(x)[0] for x in x_seq])
