"""MLP presets for N-MNIST (2312-200-10) and SHD (700-450-20, optionally recurrent), built as ordinary
SpikingJelly or snnTorch models. Frameworks are imported only inside the builders."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .vgg9 import check_framework, check_step_mode, import_framework, make_neuron_factory

NMNIST_FEATURES = 2 * 34 * 34  # 2312
SHD_FEATURES = 700


class RecurrentInput(nn.Module):
    """The connection of SpikingJelly's ``LinearRecurrentContainer`` as snnTorch's ``RLeaky`` has it:
    given ``[x, s]`` (the layer's input and its spikes of the previous step) it returns ``x + R s``; only
    ``R`` (``features x features``, initialised as ``nn.Linear``'s) is a parameter. The container's own
    ``nn.Linear`` maps all of ``[x, s]``, so its input block, though initialised to the identity, is
    trained too: with TP's update at every step it drifts and turns the input layer's bias into a constant
    drive that keeps some neurons firing through silence (measured: 15% of the SHD preset's neurons,
    held-out accuracy at chance)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.weight = nn.Parameter(nn.Linear(features, features, bias=False).weight.detach().clone())

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        x, s = xs.split([self.features, self.features], dim=-1)
        return x + nn.functional.linear(s, self.weight)

    def extra_repr(self) -> str:
        return f"features={self.features}"


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _readout(framework: str, step_mode: str, in_features: int, num_classes: int, spiking_output: bool, make_neuron) -> List[nn.Module]:
    if framework == "spikingjelly":
        layer = import_framework("spikingjelly")[0]
        modules: List[nn.Module] = [layer.Linear(in_features, num_classes, step_mode=step_mode)]
        if spiking_output:
            modules.append(make_neuron())
        return modules
    modules = [nn.Linear(in_features, num_classes)]
    if spiking_output:
        modules.append(make_neuron(output=True))
    return modules


def mlp_nmnist(
    framework: str = "spikingjelly",
    hidden: int = 200,
    num_classes: int = 10,
    in_features: int = NMNIST_FEATURES,
    neuron: Optional[Callable[[], nn.Module]] = None,
    tau: float = 2.0,
    step_mode: str = "m",
    spiking_output: bool = False,
    neuron_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Sequential:
    """N-MNIST MLP, 2312-200-10: flatten (34x34x2), linear, LIF, linear readout (or a spiking output layer).

    :param framework: ``"spikingjelly"`` or ``"snntorch"``.
    :param hidden: hidden LIF neurons.
    :param spiking_output: end with a LIF layer (spike-count output) instead of the linear readout. snnTorch:
        the output ``Leaky`` has ``output=True`` and the model returns ``(spk, mem)``.
    :param neuron, tau, step_mode, neuron_kwargs: as in :func:`vgg9`.
    :return: SpikingJelly, ``step_mode="m"``: ``[T, B, 2, 34, 34]`` (or ``[T, B, 2312]``) -> ``[T, B, 10]``;
        snnTorch (single-step, ``init_hidden=True``): ``[B, 2, 34, 34]`` -> ``[B, 10]`` per step.

    Example::

        model = mlp_nmnist(framework="snntorch")
        outs = torch.stack([model(x) for x in x_seq])                # x_seq: [T, B, 2, 34, 34]
    """
    framework = check_framework(framework)
    step_mode = check_step_mode(step_mode)
    _check_positive(hidden=hidden, num_classes=num_classes, in_features=in_features)
    make_neuron = make_neuron_factory(framework, neuron, tau, step_mode, neuron_kwargs)
    if framework == "spikingjelly":
        layer = import_framework("spikingjelly")[0]
        modules: List[nn.Module] = [
            layer.Flatten(step_mode=step_mode),
            layer.Linear(in_features, hidden, step_mode=step_mode),
            make_neuron(),
        ]
    else:
        modules = [nn.Flatten(), nn.Linear(in_features, hidden), make_neuron()]
    modules += _readout(framework, step_mode, hidden, num_classes, spiking_output, make_neuron)
    return nn.Sequential(*modules)


def mlp_shd(
    recurrent: bool = False,
    framework: str = "spikingjelly",
    hidden: int = 450,
    num_classes: int = 20,
    in_features: int = SHD_FEATURES,
    neuron: Optional[Callable[[], nn.Module]] = None,
    tau: float = 2.0,
    step_mode: str = "m",
    spiking_output: bool = False,
    neuron_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Sequential:
    """SHD MLP, 700-450-20: linear, LIF (optionally recurrent), linear readout (or a spiking output layer).

    Recurrent variant:

    * snnTorch: ``snn.RLeaky(linear_features=hidden, init_hidden=True)`` — the hidden layer receives
      ``W x[t] + R s[t-1]`` (``R`` a ``hidden x hidden`` linear with bias). A ``neuron=`` factory must then
      return an ``RLeaky``-like module.
    * SpikingJelly: ``layer.LinearRecurrentContainer`` around the (single-step) hidden LIF, its connection
      (``rc``) a :class:`RecurrentInput`: the neuron gets ``W x[t] + R s[t-1]`` as in snnTorch (``R``
      without bias). The container's own connection, one trainable linear map of ``[x[t], s[t-1]]``,
      would train an identity block too, which TP turns into a constant drive (see
      :class:`RecurrentInput`).

    :param recurrent: add the recurrent connection to the hidden layer.
    :param neuron, tau, step_mode, spiking_output, neuron_kwargs: as in :func:`mlp_nmnist`.
    :return: SpikingJelly, ``step_mode="m"``: ``[T, B, 700]`` -> ``[T, B, 20]``; snnTorch: ``[B, 700]`` ->
        ``[B, 20]`` per step.

    Example::

        model = mlp_shd(recurrent=True)                               # SpikingJelly, multi-step
        out = model(x_seq)                                            # [T, B, 700] -> [T, B, 20]
    """
    framework = check_framework(framework)
    step_mode = check_step_mode(step_mode)
    _check_positive(hidden=hidden, num_classes=num_classes, in_features=in_features)
    make_neuron = make_neuron_factory(framework, neuron, tau, step_mode, neuron_kwargs)
    if framework == "spikingjelly":
        layer = import_framework("spikingjelly")[0]
        modules: List[nn.Module] = [layer.Linear(in_features, hidden, step_mode=step_mode)]
        if recurrent:
            container_cls = getattr(layer, "LinearRecurrentContainer", None)
            if container_cls is None:
                raise NotImplementedError(
                    "mlp_shd(recurrent=True, framework='spikingjelly') needs "
                    "spikingjelly.activation_based.layer.LinearRecurrentContainer, which this SpikingJelly "
                    "version lacks; upgrade SpikingJelly, or use framework='snntorch' (snn.RLeaky)."
                )
            container = container_cls(make_neuron("s"), hidden, hidden, bias=False, step_mode=step_mode)
            container.rc = RecurrentInput(hidden)
            modules.append(container)
        else:
            modules.append(make_neuron())
    else:
        hidden_neuron = make_neuron(linear_features=hidden) if recurrent else make_neuron()
        modules = [nn.Linear(in_features, hidden), hidden_neuron]
    modules += _readout(framework, step_mode, hidden, num_classes, spiking_output, make_neuron)
    return nn.Sequential(*modules)
