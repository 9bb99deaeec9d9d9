"""CUDA graphs of online SLTT steps (``cuda_graphs=True``).

Without a GPU the graphs run through tests/graph_emulator.py, which records every aten op of a capture
(forward and backward), leaves no trace of the capture (old memory restored, new memory garbage) and
replays the ops on the same tensors with no Python in between. Training with graphs must then give the
parameters, losses and output counts of eager training exactly: the same kernels run on the same values;
only the plumbing (static input and state buffers, in-place gradient accumulation, outputs read before
the next replay) differs, and that is what is checked. The GPU tests at the end run real CUDA graphs.
"""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn

import snn_localrules as slr
from tests.graph_emulator import emulate
from tests.models import sj_conv, sj_mlp, snn_sequential

T, B = 7, 6


def _sj_dropout_mlp():
    from spikingjelly.activation_based import functional, layer, neuron

    model = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0), layer.Dropout(0.3),
                          layer.Linear(16, 5), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(model, "s")
    return model


MODELS = {
    "sj-mlp-s": (lambda: sj_mlp("LIFNode", step_mode="s", tau=2.0), (12,)),
    "sj-plif-m": (lambda: sj_mlp("ParametricLIFNode", step_mode="m"), (12,)),
    "sj-if-soft-s": (lambda: sj_mlp("IFNode", step_mode="s", v_reset=None), (12,)),
    "sj-conv-bn-m": (lambda: sj_conv("m"), (2, 8, 8)),
    "sj-dropout-s": (_sj_dropout_mlp, (12,)),
    "snntorch-leaky": (lambda: snn_sequential("Leaky"), (12,)),
    "snntorch-synaptic": (lambda: snn_sequential("Synaptic"), (12,)),
}


def _batches(shape, n=3, seed=5, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(T, batch, *shape, generator=g) * 6.0, torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def _build(name):
    """The model, with its weights scaled up so that every layer spikes on these inputs."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(4.0)
    return model


def _train(name, cuda_graphs, batches=None, **options):
    shape = MODELS[name][1]
    model = _build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    learner = slr.wrap(model, rule="sltt", optimizer=optimizer, seed=11, cuda_graphs=cuda_graphs, **options)
    torch.manual_seed(1)  # the same dropout draws in both runs
    stats = [learner.step(x, y) for x, y in (batches or _batches(shape))]
    return model, learner, stats


def _assert_same_training(eager, graphed):
    (model0, _, stats0), (model1, _, stats1) = eager, graphed
    assert [s.loss for s in stats1] == [s.loss for s in stats0]
    for s0, s1 in zip(stats0, stats1):
        assert torch.equal(s1.output_counts, s0.output_counts)
    for (name, p0), (_, p1) in zip(model0.named_parameters(), model1.named_parameters()):
        assert torch.equal(p1, p0), name
    for (name, b0), (_, b1) in zip(model0.named_buffers(), model1.named_buffers()):
        if isinstance(b0, torch.Tensor) and isinstance(b1, torch.Tensor) and b0.shape == b1.shape:
            assert torch.equal(b1, b0), name  # batch-norm running statistics


def _replays(made):
    return sum(g.replays for g in made)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_graphed_training_equals_eager(monkeypatch, name):
    eager = _train(name, False)
    made = emulate(monkeypatch)
    graphed = _train(name, True)
    _assert_same_training(eager, graphed)
    learner = graphed[1]
    assert learner.graphs.off is None and learner.graphs.captured == 1
    assert all(s.output_counts.sum() > 0 for s in graphed[2])  # the output layer spikes
    # warm-up: the first batch's first two steps run eagerly; every later step is replayed, including the
    # first step of each later batch (a SpikingJelly float state is filled in), except where a dropout
    # mask is drawn (it is made by the first step of a batch)
    later = T - 1 if "dropout" in name else T
    assert _replays(made) == T - 2 + 2 * later


@pytest.mark.parametrize("options", [dict(chunk=2), dict(chunk=3), dict(K=3), dict(K=4, chunk=2),
                                     dict(K=2, sample="last")], ids=str)
@pytest.mark.parametrize("name", ["sj-conv-bn-m", "snntorch-leaky"])
def test_chunks_and_sltt_k_equal_eager(monkeypatch, name, options):
    eager = _train(name, False, **options)
    made = emulate(monkeypatch)
    graphed = _train(name, True, **options)
    _assert_same_training(eager, graphed)
    assert graphed[1].graphs.off is None
    assert _replays(made) > 0


def test_mixed_precision_equals_eager(monkeypatch):
    eager = _train("sj-conv-bn-m", False, autocast=torch.bfloat16)
    made = emulate(monkeypatch)
    graphed = _train("sj-conv-bn-m", True, autocast=torch.bfloat16)
    _assert_same_training(eager, graphed)
    assert _replays(made) > 0


def test_grad_scaler_equals_eager(monkeypatch):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("no torch.amp.GradScaler for CPU in this torch (2.3 added it)")

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=1)

    eager = _train("sj-mlp-s", False, scaler=scaler())
    made = emulate(monkeypatch)
    graphed = _train("sj-mlp-s", True, scaler=scaler())
    _assert_same_training(eager, graphed)
    assert _replays(made) > 0
    assert graphed[1].scaler.get_scale() == eager[1].scaler.get_scale() == 2.0 ** 9  # grown once per batch


def test_a_smaller_batch_and_eval_mode_get_graphs_of_their_own(monkeypatch):
    """Batches of 6, a last batch of 3, then batches of 6 in eval mode (batch norm on its running
    statistics): three graphs, and training equal to eager throughout."""
    from tests.conftest import skip_unless_eval_mode_neurons_have_gradients

    skip_unless_eval_mode_neurons_have_gradients()
    shape = MODELS["sj-conv-bn-m"][1]
    batches = _batches(shape, n=3) + _batches(shape, n=3, seed=9, batch=3) + _batches(shape, n=3, seed=8)

    def run(cuda_graphs):
        model = _build("sj-conv-bn-m")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, cuda_graphs=cuda_graphs)
        stats = []
        for i, (x, y) in enumerate(batches):
            if i == 6:
                model.eval()
            stats.append(learner.step(x, y))
        return model, learner, stats

    eager = run(False)
    emulate(monkeypatch)
    graphed = run(True)
    _assert_same_training(eager, graphed)
    assert graphed[1].graphs.captured == 3  # batch 6 training, batch 3 training, batch 6 eval


def test_user_zero_grad_and_freezing_between_batches(monkeypatch):
    """Gradients set to None by the user's own zero_grad are given back; a parameter frozen between batches
    makes the graphs stale: they are captured again, and training still equals eager."""

    def run(cuda_graphs):
        shape = MODELS["sj-mlp-s"][1]
        model = _build("sj-mlp-s")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, cuda_graphs=cuda_graphs)
        stats = []
        for i, (x, y) in enumerate(_batches(shape, n=4)):
            optimizer.zero_grad(set_to_none=True)
            if i == 2:
                model[0].weight.requires_grad_(False)
            stats.append(learner.step(x, y))
        return model, learner, stats

    eager = run(False)
    made = emulate(monkeypatch)
    graphed = run(True)
    _assert_same_training(eager, graphed)
    assert len(made) == 2 and _replays(made) > 2 * T


def test_chunk_auto_is_measured_eagerly_then_replayed(monkeypatch):
    options = dict(chunk="auto", max_memory=36 * 2 ** 10)  # 3 steps of this model (spikes packed)
    eager = _train("sj-conv-bn-m", False, **options)
    made = emulate(monkeypatch)
    graphed = _train("sj-conv-bn-m", True, **options)
    _assert_same_training(eager, graphed)
    assert graphed[1].chunk_size == eager[1].chunk_size and 1 < graphed[1].chunk_size < T
    assert _replays(made) > 0


def test_a_resumed_checkpoint_trains_on_with_new_graphs(monkeypatch, tmp_path):
    """Save after two batches, load into a new model and learner (its own graphs), train the third:
    the same parameters as three batches in one run, graphs in both."""
    emulate(monkeypatch)
    batches = _batches(MODELS["sj-conv-bn-m"][1])
    straight = _train("sj-conv-bn-m", True, batches=batches)

    def learner_for(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        return slr.wrap(model, rule="sltt", optimizer=optimizer, seed=11, cuda_graphs=True)

    first = learner_for(_build("sj-conv-bn-m"))
    torch.manual_seed(1)
    for x, y in batches[:2]:
        first.step(x, y)
    first.save(tmp_path / "ckpt.pt")
    model = _build("sj-conv-bn-m")
    resumed = learner_for(model)
    resumed.load(tmp_path / "ckpt.pt")
    stats = resumed.step(*batches[2])
    assert stats.loss == straight[2][2].loss
    for (name, a), (_, b) in zip(straight[0].named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


class _ItemInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = sj_mlp("LIFNode", step_mode="s", tau=2.0)

    def forward(self, x):
        out = self.body(x)
        if out.sum() > 1e9:  # a host synchronisation: cannot be captured
            out = out * 0
        return out


def test_a_model_that_cannot_be_captured_trains_eagerly_and_says_why_once(monkeypatch):
    def run(cuda_graphs):
        torch.manual_seed(0)
        model = _ItemInForward()
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                           cuda_graphs=cuda_graphs)
        return model, learner, [learner.step(x, y) for x, y in _batches((12,))]

    eager = run(False)
    emulate(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = run(True)
    said = [w for w in caught if "CUDA graphs are off" in str(w.message)]
    assert len(said) == 1 and "host synchronisation" in str(said[0].message)
    assert "not permitted when stream is capturing" in graphed[1].graphs.off
    _assert_same_training(eager, graphed)  # the failed capture left no trace


class _NoSyncModel(nn.Sequential):
    """What the learner sees of a DistributedDataParallel model: a no_sync() context."""

    def no_sync(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("case", ["cpu", "distributed"])
def test_batches_graphs_cannot_serve_run_eagerly_with_one_warning(monkeypatch, case):
    if case == "distributed":
        emulate(monkeypatch)
        model, said = _NoSyncModel(*sj_mlp("LIFNode", step_mode="s", tau=2.0)), "distributed"
    else:
        model, said = sj_mlp("LIFNode", step_mode="s", tau=2.0), "the batch is on cpu"
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       cuda_graphs=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in _batches((12,), n=3):
            learner.step(x, y)
    assert [str(w.message) for w in caught if "CUDA graphs are off" in str(w.message)] == [
        f"CUDA graphs are off for this learner: {learner.graphs.off}. Online steps run eagerly."]
    assert said in learner.graphs.off and learner.graphs.captured == 0


def test_options_are_checked():
    model = sj_mlp("LIFNode", step_mode="s")
    with pytest.raises(slr.WrapError, match="cuda_graphs must be True or False"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), cuda_graphs="yes")
    with pytest.raises(slr.WrapError, match="needs an optimizer"):
        slr.wrap(model, rule="sltt", cuda_graphs=True)


def test_unwrap_drops_the_graphs(monkeypatch):
    emulate(monkeypatch)
    model, learner, _ = _train("sj-mlp-s", True)
    assert learner.graphs.captured == 1
    slr.unwrap(model)
    assert learner.graphs.captured == 0


def test_the_emulator_leaves_no_trace_of_a_capture_and_replays_in_place():
    """The emulator itself: a capture restores memory it wrote and leaves new memory as garbage; a replay
    recomputes into the captured outputs and accumulates in place again."""
    from tests.graph_emulator import EmulatedGraph, require_emulator

    require_emulator()

    weight = torch.ones(3, requires_grad=True)
    weight.grad = torch.zeros(3)
    x = torch.tensor([1.0, 2.0, 3.0])
    graph = EmulatedGraph()
    with graph.capture():
        out = (weight * x).sum()
        out.backward()
    assert torch.equal(weight.grad, torch.zeros(3))  # the capture ran nothing
    assert torch.isnan(out)  # the capture's output is garbage until replayed
    graph.replay()
    assert out.item() == 6.0 and torch.equal(weight.grad, x)
    x.mul_(2)
    graph.replay()
    assert out.item() == 12.0 and torch.equal(weight.grad, 3 * x / 2)  # accumulated: x + 2x
    with pytest.raises(RuntimeError, match="capturing"):
        with EmulatedGraph().capture():
            float(x.sum())


# -- real CUDA graphs (the lent GPU) ---------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("options", [dict(), dict(chunk=2), dict(K=3)], ids=str)
@pytest.mark.parametrize("name", ["sj-conv-bn-m", "sj-mlp-s", "snntorch-synaptic", "sj-dropout-s"])
def test_cuda_graphs_equal_eager_on_gpu(name, options):
    def run(cuda_graphs):
        shape = MODELS[name][1]
        model = _build(name).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, seed=11, cuda_graphs=cuda_graphs, **options)
        torch.manual_seed(1)
        stats = [learner.step(x.cuda(), y.cuda()) for x, y in _batches(shape)]
        return model, learner, stats

    eager = run(False)
    graphed = run(True)
    assert graphed[1].graphs.off is None and graphed[1].graphs.captured >= 1
    (m0, _, s0), (m1, _, s1) = eager, graphed
    for a, b in zip(s0, s1):
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    for (n, p0), (_, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=n)
