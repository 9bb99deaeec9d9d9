import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of hundreds of tiny cases: intra-op threads only add overhead there (on a loaded machine
    they made test_sltt_reference 5x slower). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(model):
    """Everything unwrap must restore: classes, state_dict values, step modes, hooks, instance forwards."""
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [(n, getattr(m, "step_mode", None)) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks), "forward" in vars(m))
            for n, m in model.named_modules()
        ],
        "params": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def assert_same_snapshot(before, after):
    assert before["classes"] == after["classes"]
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["params"] == after["params"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def skip_unless_eval_mode_neurons_have_gradients():
    """SpikingJelly before 2.0 runs neurons in eval mode through a Heaviside without surrogate, so no
    gradient flows in eval mode there; tests that train an eval-mode model (to freeze BN statistics and
    dropout) do not apply to it."""
    from spikingjelly.activation_based import neuron

    node = neuron.LIFNode().eval()
    x = torch.ones(2, 3, requires_grad=True)
    if not node(x).requires_grad:
        pytest.skip("this SpikingJelly's neurons give no gradient in eval mode (releases before 2.0)")
