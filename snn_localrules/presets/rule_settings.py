"""The papers' training settings as presets of rule options, for ``slr.wrap(model, rule=..., **options)``.

Only the rule's own options are returned; the optimizer is the caller's (see the docstrings for the
papers' choices).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

# name -> (T, K, loss); K None: plain SLTT (the SLTT paper reports SLTT-K only on the large/DVS sets). The
# losses are those of the authors' run commands (their README): the default mix with an all-ones MSE target
# (loss_lambda 0.05, loss_means 1), the one-hot target for DVS-CIFAR10 (-mse_n_reg), CE alone for ImageNet
# (-loss_lambda 0.0)
_SLTT = {
    "dvs-gesture": (20, 4, "ce+mse"),
    "dvs-cifar10": (10, 2, "ce+mse_onehot"),
    "imagenet": (6, 2, "ce"),
    "cifar10": (6, None, "ce+mse"),
    "cifar100": (6, None, "ce+mse"),
}

# name -> (num_classes, trace_decay)
_TP = {
    "dvs-gesture": (11, 0.98),
    "dvs-cifar10": (10, 0.19),
    "nmnist": (10, 0.8),
    "shd": (20, 0.8),
}

_ALIASES = {
    "dvsgesture": "dvs-gesture",
    "dvs128gesture": "dvs-gesture",
    "gesture": "dvs-gesture",
    "dvscifar10": "dvs-cifar10",
    "cifar10dvs": "dvs-cifar10",
    "imagenet": "imagenet",
    "imagenet1k": "imagenet",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "nmnist": "nmnist",
    "shd": "shd",
}

SLTT_TAU = 1.1
SLTT_THRESHOLD = 1.0


def _resolve(dataset: Any, table: Dict[str, Any], rule: str) -> str:
    key = None
    if isinstance(dataset, str):
        squeezed = "".join(ch for ch in dataset.lower() if ch.isalnum())
        key = _ALIASES.get(squeezed)
    if key not in table:
        raise ValueError(
            f"no {rule} preset for dataset {dataset!r}; known datasets: {', '.join(sorted(table))}."
        )
    return key


def sltt_options(dataset: str, sltt_k: bool = True) -> Dict[str, Any]:
    """The SLTT paper's (Meng et al., ICCV 2023) rule settings for ``dataset``.

    ============  ===  =====  ==================================
    dataset        T    K     loss
    ============  ===  =====  ==================================
    dvs-gesture    20   4     ``"ce+mse"`` (alpha = 0.05)
    dvs-cifar10    10   2     ``"ce+mse_onehot"`` (alpha = 0.05)
    imagenet       6    2     ``"ce"``
    cifar10/100    6    --    ``"ce+mse"`` (plain SLTT)
    ============  ===  =====  ==================================

    The losses are the authors' run commands': ``"ce+mse"`` is their default mix ``(1 - 0.05) CE +
    0.05 MSE(o, 1)`` (the all-ones target works as a regulariser), ``"ce+mse_onehot"`` the same with the
    one-hot label as MSE target (their ``-mse_n_reg``, given for DVS-CIFAR10), ImageNet CE alone. (A summary
    often read off the paper, "phi = 1 on DVS data, CE only elsewhere", is off on CIFAR and DVS-CIFAR10.) ``K`` (SLTT-K) needs online
    mode, i.e. an ``optimizer=`` in ``slr.wrap``; pass ``sltt_k=False`` for plain SLTT (all steps). ``T`` makes
    the learner check that every batch has the paper's number of steps. The paper's neuron is given by
    :func:`sltt_neuron_kwargs`.

    The optimizer and the network are the caller's. The authors train with SGD (momentum 0.9) and cosine
    annealing over the epochs, with mixed precision: CIFAR-10 lr 0.1, weight decay 5e-5, batch 128, 200
    epochs (CIFAR-100: weight decay 5e-4), PreAct ResNet-18; DVS-CIFAR10 lr 0.05, weight decay 5e-4, batch
    128, 300 epochs, dropout 0.3, frames resized to 48x48; DVS-Gesture lr 0.1, weight decay 5e-4, batch 16,
    300 epochs, dropout 0.4, 128x128; both DVS sets with a VGG-11 with batch norm (conv, BN, LIF, dropout;
    average pooling). ImageNet (NF-ResNet-34/50/101) is trained at T=1 first (100 epochs) and then fine-tuned
    at T=6 (30 epochs, lr 1e-3, no weight decay): this preset is the second stage.

    :param dataset: one of the names above (case, ``-``/``_`` ignored; ``cifar10dvs`` and
        ``dvs128gesture`` are accepted as aliases).
    :return: ``{"loss": ..., "T": ..., "K": ...}`` (``K`` only with SLTT-K).
    :raises ValueError: unknown dataset (the message lists the known ones).

    Example::

        learner = slr.wrap(model, rule="sltt", optimizer=opt, **sltt_options("dvs-gesture"))
    """
    steps, k, loss = _SLTT[_resolve(dataset, _SLTT, "SLTT")]
    options: Dict[str, Any] = {"loss": loss, "T": steps}
    if sltt_k and k is not None:
        options["K"] = k
    return options


def sltt_neuron_kwargs(framework: str = "spikingjelly") -> Dict[str, Any]:
    """The SLTT paper's LIF: ``tau = 1.1``, threshold 1, soft reset (subtraction), no input decay, and in
    SpikingJelly the authors' default "triangle" surrogate (``surrogate.PiecewiseQuadratic()``, whose
    derivative is a triangle; one instance, shared by the neurons built from these arguments).

    For the ``neuron_kwargs=`` of the preset builders: SpikingJelly ``LIFNode`` arguments, or snnTorch
    ``Leaky`` arguments (``beta = 1 - 1/tau``; snnTorch's own ``surrogate.triangular`` is another function,
    so the snnTorch neuron keeps its default surrogate). ``detach_reset=True`` as the SLTT paper states;
    the authors' neuron leaves the reset attached, which changes no SLTT gradient (its membrane enters
    the next step detached) but would a BPTT baseline's. SpikingJelly 0.0.0.0.14's ``PiecewiseQuadratic``
    has no CuPy code: with ``backend='cupy'`` there, pass another surrogate for runs of the whole model.

    Example::

        model = vgg9(num_classes=11, neuron_kwargs=sltt_neuron_kwargs())
    """
    from .vgg9 import check_framework

    if check_framework(framework) == "spikingjelly":
        from spikingjelly.activation_based import surrogate

        return dict(tau=SLTT_TAU, v_threshold=SLTT_THRESHOLD, v_reset=None, decay_input=False, detach_reset=True,
                    surrogate_function=surrogate.PiecewiseQuadratic())
    return dict(beta=1.0 - 1.0 / SLTT_TAU, threshold=SLTT_THRESHOLD, reset_mechanism="subtract")


def tp_options(dataset: str, seed: Optional[int] = None) -> Dict[str, Any]:
    """Traces Propagation (Pes et al., 2025) rule settings for ``dataset``: ``num_classes`` and the trace
    decay ``trace_decay`` (beta of ``eps[t] = beta eps[t-1] + s[t]``).

    ============  ===========  ===========  =================================================
    dataset        num_classes  trace_decay  source
    ============  ===========  ===========  =================================================
    dvs-gesture    11           0.98         the authors' VGG-9 run script (trace leak)
    dvs-cifar10    10           0.19         the authors' VGG-9 run script (trace leak)
    nmnist         10           0.8          this library's default (not a tuned paper value)
    shd            20           0.8          this library's default (not a tuned paper value)
    ============  ===========  ===========  =================================================

    The optimizer is the caller's: the authors train with **Adam, lr 1e-4** (batch 64, cosine annealing), e.g.
    ``torch.optim.Adam(model.parameters(), lr=1e-4)``. Their VGG-9 runs also use weight-standardized
    convolutions (:func:`vgg9`) and soft-reset LIF neurons (threshold 1.0 and membrane leak 0.53 on
    DVS-Gesture; threshold 0.5 and leak 0.18 on DVS-CIFAR10). Keep the learning rate low (1e-4 to 1e-3): TP
    takes an optimizer step at every time step, T per batch. This project's MLP example and benchmark use Adam
    1e-3 on the N-MNIST-like data (84% held-out). Measured here on the offline spoken keywords (15 epochs,
    batch 32, T=20, held-out voices), SpikingJelly's recurrent :func:`mlp_shd` reached 34% at Adam lr 1e-3
    and 77% at 3e-4 (snnTorch's 71% at both): SpikingJelly's LIF, whose soft reset comes before the leak,
    fires at twice snnTorch's rate for the same input and is the more sensitive of the two.

    :param dataset: one of the names above (case, ``-``/``_`` ignored).
    :param seed: if given, the seed of TP's fixed random label projection.
    :return: ``{"num_classes": ..., "trace_decay": ...}`` (and ``seed``).
    :raises ValueError: unknown dataset (the message lists the known ones).

    Example::

        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        learner = slr.wrap(model, rule="tp", optimizer=opt, **tp_options("dvs-gesture"))
    """
    num_classes, decay = _TP[_resolve(dataset, _TP, "TP")]
    options: Dict[str, Any] = {"num_classes": num_classes, "trace_decay": decay}
    if seed is not None:
        options["seed"] = seed
    return options
