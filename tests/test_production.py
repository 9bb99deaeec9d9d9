"""Production use of online SLTT: torch.distributed (2 gloo processes), mixed precision, checkpoints."""
import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn

import snn_localrules as slr
from snn_localrules.checkpoint import atomic_save
from tests.models import sj_mlp

T, B = 5, 8


def _data(seed=1, batches=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.rand(T, B, 12, generator=g) * 2.5), torch.randint(0, 5, (B,), generator=g)) for _ in range(batches)]


def _rendezvous(tmp_path) -> str:
    """A file the processes of one test meet at: a TCP port picked free can be taken by another process
    before the first rank binds it; a file in the test's own directory cannot."""
    return f"file://{tmp_path / 'rendezvous'}"


def _fresh_model(step_mode):
    torch.manual_seed(0)
    if step_mode == "snntorch":  # membranes in buffers, which DDP would copy from rank 0 at every forward
        from tests.models import snn_sequential

        return snn_sequential()
    return sj_mlp("LIFNode", step_mode=step_mode, tau=2.0)


# -- torch.distributed ---------------------------------------------------------------------------
def _exit_worker() -> None:
    """End a worker that has written its results and left its process group without the interpreter's
    teardown: there torch's gloo threads rarely abort the process ("terminate called without an active
    exception", SIGABRT: seen about once in a hundred runs of these tests, always after a full pass of
    the suite), which failed a test whose results were all written."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _counting_ddp(rank, world, rendezvous, net):
    """Join a 2-process gloo group and wrap ``net`` in DDP whose all-reduces are counted."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    model = DDP(net)
    reductions = []

    def counting_allreduce(state, bucket):
        reductions.append(1)
        tensor = bucket.buffer().div_(world)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_allreduce)
    return model, reductions


def _ddp_worker(rank, world, rendezvous, step_mode, K, chunk, out_dir):
    import torch.distributed as dist

    model, reductions = _counting_ddp(rank, world, rendezvous, _fresh_model(step_mode))
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        learner = slr.wrap(model, rule="sltt", optimizer=optimizer, K=K, seed=3, chunk=chunk)
        per_batch = []
        for x, y in _data(batches=2):
            before = len(reductions)
            half = slice(rank * B // world, (rank + 1) * B // world)
            learner.step(x[:, half], y[half])
            per_batch.append(len(reductions) - before)
        learner.unwrap()
        if rank == 0:
            torch.save({"params": [p.detach().clone() for p in model.module.parameters()],
                        "reductions": per_batch}, os.path.join(out_dir, "ddp.pt"))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    _exit_worker()


@pytest.mark.parametrize("step_mode,K,chunk", [("s", None, 1), ("m", None, 1), ("s", 2, 1), ("m", None, 2),
                                              ("snntorch", None, 1)])
def test_ddp_two_processes_match_single_process_on_the_whole_batch(tmp_path, step_mode, K, chunk):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _rendezvous(tmp_path), step_mode, K, chunk, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt")

    model = _fresh_model(step_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    learner = slr.wrap(model, rule="sltt", optimizer=optimizer, K=K, seed=3)
    for x, y in _data(batches=2):
        learner.step(x, y)
    for distributed, single in zip(result["params"], model.parameters()):
        torch.testing.assert_close(distributed, single.detach(), rtol=1e-5, atol=1e-6)
    # one all-reduce (of the model's single gradient bucket) per batch, not one per time step
    assert result["reductions"] == [1, 1]


# -- mixed precision -----------------------------------------------------------------------------
def test_bf16_autocast_trains_close_to_fp32():
    results = {}
    for autocast in (None, torch.bfloat16):
        model = _fresh_model("s")
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           autocast=autocast)
        seen = []
        linear_dtypes = []
        handle = model[0].register_forward_hook(lambda m, i, o: linear_dtypes.append(o.dtype))
        for x, y in _data(batches=3):
            stats = learner.step(x, y)
            seen.append(stats.loss)
        handle.remove()
        assert stats.output_counts.dtype == torch.float32  # counted in fp32 even under bf16
        results[autocast] = (seen, [p.detach().clone() for p in model.parameters()], set(linear_dtypes))
    assert results[None][2] == {torch.float32}
    assert results[torch.bfloat16][2] == {torch.bfloat16}
    fp32, bf16 = results[None], results[torch.bfloat16]
    # the first batch closely; later ones drift as spike flips compound over T optimizer steps per batch
    for batch, (a, b) in enumerate(zip(fp32[0], bf16[0])):
        assert abs(a - b) < (0.02 if batch == 0 else 0.1) * abs(a) + 1e-3
    for a, b in zip(fp32[1], bf16[1]):
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-3
        assert not torch.equal(a, b)  # bf16 really ran


def _cpu_scaler(**kwargs):
    try:
        return torch.amp.GradScaler("cpu", **kwargs)
    except (AttributeError, TypeError, RuntimeError) as exc:  # pragma: no cover - old torch
        pytest.skip(f"no CPU GradScaler in this torch: {exc}")


def test_grad_scaler_updates_once_per_batch_not_per_step():
    model = _fresh_model("s")
    scaler = _cpu_scaler(init_scale=2.0 ** 4, growth_interval=1)
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    (x, y), = _data()
    reference = _fresh_model("s")
    ref_learner = slr.wrap(reference, rule="sltt", optimizer=torch.optim.SGD(reference.parameters(), lr=0.1))
    stats = learner.step(x, y)
    ref_learner.step(x, y)
    assert not stats.skipped
    assert scaler.get_scale() == 2.0 ** 5  # grown once for the batch (T backwards would have been 2**9)
    for a, b in zip(model.parameters(), reference.parameters()):  # unscaled before the step: same update
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_the_whole_batch():
    model = _fresh_model("s")
    scaler = _cpu_scaler(init_scale=2.0 ** 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    learner = slr.wrap(model, rule="sltt", optimizer=optimizer, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    # an infinite gradient in one step's backward, as a float16 overflow would give
    handle = model[2].weight.register_hook(lambda g: g * float("inf"))
    (x, y), = _data()
    stats = learner.step(x, y)
    handle.remove()
    assert stats.skipped
    assert scaler.get_scale() == 2.0 ** 9
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert optimizer.state_dict()["state"] == {}  # no momentum was taken from the skipped batch
    assert not learner.step(x, y).skipped  # and training goes on


def test_wrong_scaler_and_autocast_options_are_refused():
    model = _fresh_model("s")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(slr.WrapError, match="GradScaler"):
        slr.wrap(model, rule="sltt", optimizer=opt, scaler=object())
    with pytest.raises(slr.WrapError, match="online mode"):
        slr.wrap(model, rule="sltt", scaler=_cpu_scaler())
    with pytest.raises(slr.WrapError, match="autocast"):
        slr.wrap(model, rule="sltt", optimizer=opt, autocast="fp16")
    assert not any(len(m._forward_pre_hooks) for m in model.modules())


# -- checkpoints ---------------------------------------------------------------------------------
def _train(model, learner, batches):
    for x, y in batches:
        learner.step(x, y)


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, optimizer_name):
    def make():
        model = nn.Sequential(*_fresh_model("s"))
        model.insert(1, nn.Dropout(0.2))  # draws from the global RNG: restored by load()
        make_opt = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2),
                    "sgd": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9)}[optimizer_name]
        opt = make_opt(model.parameters())
        return model, slr.wrap(model, rule="sltt", optimizer=opt, K=2, seed=7)

    batches = _data(batches=6)
    torch.manual_seed(123)
    model_a, learner_a = make()
    _train(model_a, learner_a, batches)

    torch.manual_seed(123)
    model_b, learner_b = make()
    _train(model_b, learner_b, batches[:3])
    learner_b.save(tmp_path / "ckpt.pt", batch=3)
    torch.manual_seed(999)  # the interrupted process's RNG is gone
    model_c, learner_c = make()
    extra = learner_c.load(tmp_path / "ckpt.pt")
    assert extra == {"batch": 3}
    _train(model_c, learner_c, batches[extra["batch"]:])
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert learner_a.generator.get_state().equal(learner_c.generator.get_state())


def test_checkpoint_holds_options_optimizer_and_generator():
    model = _fresh_model("s")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    learner = slr.wrap(model, rule="sltt", optimizer=opt, K=2, seed=5, T=T)
    _train(model, learner, _data())
    state = learner.state_dict()
    assert {"rule", "K", "sample", "seed", "T", "generator", "optimizer"} <= set(state)
    assert state["optimizer"]["state"]  # Adam moments are there


def test_crash_while_saving_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"version": 1}, path)

    class Exploding:
        def __reduce__(self):
            raise RuntimeError("disk gone mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_save({"version": 2, "payload": torch.zeros(1000), "bad": Exploding()}, path)
    assert torch.load(path) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left behind


def test_loading_a_checkpoint_of_another_rule_is_refused_before_touching_the_model(tmp_path):
    model = _fresh_model("s")
    learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    other = {"model": {"0.weight": torch.zeros(1)}, "learner": {"rule": "tp"}, "rng": None, "extra": {}}
    torch.save(other, tmp_path / "tp.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rule 'tp'"):
        learner.load(tmp_path / "tp.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v)


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_a_checkpoint_of_another_model_shape_is_refused_before_anything_changes(tmp_path, rule):
    """model.load_state_dict copies what fits before it raises, and the learner (options, optimizer state,
    TP's projection) was loaded first: the next step crashed on Adam's moments of the other shape."""
    from spikingjelly.activation_based import layer, neuron

    def build(width, K):
        torch.manual_seed(width)
        model = nn.Sequential(layer.Linear(6, width), neuron.LIFNode(tau=2.0), layer.Linear(width, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.01 if K == 1 else 0.5)
        options = dict(K=K, seed=K) if rule == "sltt" else dict(num_classes=3, seed=K)
        return model, slr.wrap(model, rule=rule, optimizer=opt, **options)

    x, y = torch.rand(4, 5, 6) * 3, torch.tensor([0, 1, 2, 0, 1])
    small, saved = build(8, 1)
    saved.step(x, y)
    saved.save(tmp_path / "small.pt")
    model, learner = build(9, 3)
    learner.step(x, y)
    state = copy.deepcopy(learner.state_dict())
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.weight"):  # torch's own message
        learner.load(tmp_path / "small.pt")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = learner.state_dict()
    assert str(after) == str(state)  # options, generator, optimizer state, TP's projection as they were
    learner.step(x, y)  # and it still trains


def test_tp_resume_from_checkpoint_is_bit_identical(tmp_path):
    def make():
        torch.manual_seed(0)
        model = sj_mlp("LIFNode", step_mode="s", tau=2.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, slr.wrap(model, rule="tp", optimizer=opt, num_classes=5, seed=4)

    batches = _data(batches=4)
    model_a, learner_a = make()
    _train(model_a, learner_a, batches)
    model_b, learner_b = make()
    _train(model_b, learner_b, batches[:2])
    learner_b.save(tmp_path / "tp.pt", batch=2)
    model_c, learner_c = make()  # a fresh process would have no projection yet: load brings it
    learner_c.load(tmp_path / "tp.pt")
    assert torch.equal(learner_c.projection, learner_b.projection)
    _train(model_c, learner_c, batches[2:])
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)


def _ddp_ignore_worker(rank, world, rendezvous, out_dir):
    import copy as copy_module

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        model = DDP(_fresh_model("snntorch"))
        learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        seen = [sorted(model.parameters_to_ignore)]
        fork = copy_module.deepcopy(learner)  # its model is a copy, with its own list
        fork.unwrap()
        seen += [sorted(model.parameters_to_ignore), sorted(fork.model.parameters_to_ignore)]
        learner.unwrap()
        seen.append(sorted(model.parameters_to_ignore))
        torch.save(seen, os.path.join(out_dir, "ignored.pt"))
    finally:
        dist.destroy_process_group()
    _exit_worker()


def test_ddp_leaves_neuron_state_buffers_unbroadcast_while_wrapped(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_ignore_worker, args=(1, _rendezvous(tmp_path), str(tmp_path)), nprocs=1, join=True)
    wrapped, after_fork_unwrap, fork_after_unwrap, after_unwrap = torch.load(tmp_path / "ignored.pt")
    assert wrapped == ["1.mem", "3.mem"]  # snnTorch's membranes; nothing else
    assert after_fork_unwrap == wrapped and fork_after_unwrap == []  # a copy's unwrap releases its own model
    assert after_unwrap == []


# -- TP under torch.distributed ------------------------------------------------------------------
def _tp_model(step_mode):
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(0)
    if step_mode == "snntorch":
        import snntorch as snn

        return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.5, init_hidden=True), nn.Linear(16, 16),
                             snn.Leaky(beta=0.5, threshold=0.3, init_hidden=True), nn.Linear(16, 5))
    model = nn.Sequential(
        layer.Linear(12, 16), neuron.LIFNode(tau=2.0, v_reset=None, decay_input=False),
        layer.Linear(16, 16), neuron.LIFNode(tau=2.0, v_reset=None, decay_input=False, v_threshold=0.3),
        layer.Linear(16, 5),
    )
    functional.set_step_mode(model, step_mode)
    return model


def _tp_learner(model, label_batch, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return slr.wrap(model, rule="tp", optimizer=optimizer, num_classes=5, seed=2, label_batch=label_batch, **kwargs)


def _tp_ddp_worker(rank, world, rendezvous, step_mode, label_batch, global_contrast, split, out_dir):
    import torch.distributed as dist

    model, reductions = _counting_ddp(rank, world, rendezvous, _tp_model(step_mode))
    try:
        learner = _tp_learner(model, label_batch, global_contrast=global_contrast)
        per_batch = []
        for x, y in _data(batches=2):
            before = len(reductions)
            mine = slice(0, split) if rank == 0 else slice(split, B)
            learner.step(x[:, mine], y[mine])
            per_batch.append(len(reductions) - before)
        learner.unwrap()
        torch.save({"params": [p.detach().clone() for p in model.module.parameters()],
                    "projection": learner.projection, "reductions": per_batch},
                   os.path.join(out_dir, f"tp{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_worker()


def _run_tp_ddp(tmp_path, step_mode="s", label_batch="concat", global_contrast=None, split=B // 2):
    import torch.multiprocessing as mp

    mp.spawn(_tp_ddp_worker, args=(2, _rendezvous(tmp_path), step_mode, label_batch, global_contrast, split, str(tmp_path)),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"tp{rank}.pt") for rank in (0, 1)]


def _tp_single_process(step_mode="s", label_batch="concat"):
    model = _tp_model(step_mode)
    learner = _tp_learner(model, label_batch)
    for x, y in _data(batches=2):
        learner.step(x, y)
    return model, learner


@pytest.mark.parametrize("step_mode,label_batch", [("s", "concat"), ("m", "separate"), ("snntorch", "concat")])
def test_tp_ddp_two_processes_match_single_process_on_the_whole_batch(tmp_path, step_mode, label_batch):
    ranks = _run_tp_ddp(tmp_path, step_mode, label_batch)
    model, learner = _tp_single_process(step_mode, label_batch)
    # the projection's scale is the mean over the processes of their input scale: the same S everywhere,
    # equal to the one made from the whole batch
    torch.testing.assert_close(ranks[0]["projection"], ranks[1]["projection"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["projection"], learner.projection, rtol=1e-6, atol=0)
    for distributed, single in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(distributed, single.detach(), rtol=1e-5, atol=1e-6)
    # TP steps the optimizer at every time step: one all-reduce per step, and no more
    assert ranks[0]["reductions"] == [T, T]


def test_tp_ddp_without_global_contrast_differs_from_the_whole_batch(tmp_path):
    # each process contrasting only within its own half is a different (smaller-batch) loss: the check
    # above would catch a global contrast that silently stayed local
    ranks = _run_tp_ddp(tmp_path, global_contrast=False)
    model, _ = _tp_single_process()
    gaps = [float((d - s.detach()).abs().max()) for d, s in zip(ranks[0]["params"], model.parameters())]
    assert max(gaps) > 1e-3
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):  # DDP keeps the processes in step anyway
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tp_ddp_with_unequal_batches_keeps_processes_in_step(tmp_path):
    ranks = _run_tp_ddp(tmp_path, split=5)  # 5 samples on rank 0, 3 on rank 1 (a last, short batch)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in ranks[0]["params"])


def test_tp_global_contrast_outside_ddp_is_refused():
    model = _tp_model("s")
    with pytest.raises(slr.WrapError, match="DistributedDataParallel"):
        _tp_learner(model, "concat", global_contrast=True).step(*_data()[0])
    with pytest.raises(slr.WrapError, match="global_contrast"):
        _tp_learner(_tp_model("s"), "concat", global_contrast="yes")


# -- TP with mixed precision ---------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_a_users_autocast_block_around_several_steps_keeps_no_stale_weight_casts(rule):
    """autocast caches the bfloat16 copy of each weight made in its block; TP updates the weights at every
    time step and SLTT after each batch, so a block around several step() calls (or a copy made under
    no_grad, which torch 2.6 reuses) would run stale or graph-less copies: the learner turns the cache off
    for its forwards, and backpropagates outside autocast (as autocast= does). Then the cache of the
    user's block changes nothing, and the steps equal the autocast= option's bit for bit."""
    def train(option, block):
        model = _fresh_model("s") if rule == "sltt" else _tp_model("s")
        if rule == "sltt":
            learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), autocast=option)
        else:
            learner = _tp_learner(model, "concat", autocast=option)
        with block():
            for x, y in _data(batches=3):
                learner.step(x, y)
        return [p.detach().clone() for p in model.parameters()]

    def users_block(cache):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)

    cached, uncached = train(None, users_block(True)), train(None, users_block(False))
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    option = train(torch.bfloat16, contextlib.nullcontext)
    fp32 = train(None, contextlib.nullcontext)
    assert all(torch.equal(a, b) for a, b in zip(cached, option))
    assert not all(torch.equal(a, b) for a, b in zip(option, fp32))  # bfloat16 really ran


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_steps_run_where_autocast_does_not_know_the_device(rule, monkeypatch):
    """torch 2.1's autocast refuses a device type it does not know (Apple's mps), even to turn itself off:
    the learners' backward (and TP's losses) then run without that context, and train the same."""
    def train():
        model = _fresh_model("s") if rule == "sltt" else _tp_model("s")
        if rule == "sltt":
            learner = slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
        else:
            learner = _tp_learner(model, "concat")
        for x, y in _data(batches=2):
            learner.step(x, y)
        return [p.detach().clone() for p in model.parameters()]

    def refusing(device_type, *args, **kwargs):
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")

    plain = train()
    monkeypatch.setattr(torch, "autocast", refusing)
    assert all(torch.equal(a, b) for a, b in zip(plain, train()))


def test_tp_bf16_autocast_trains_close_to_fp32_with_float32_traces():
    results = {}
    initial = [p.detach().clone() for p in _tp_model("s").parameters()]
    for autocast in (None, torch.bfloat16):
        model = _tp_model("s")
        learner = _tp_learner(model, "concat", autocast=autocast)
        linear_dtypes, trace_dtypes = set(), set()
        handle = model[0].register_forward_hook(lambda m, i, o: linear_dtypes.add(o.dtype))
        model[3].register_forward_hook(lambda m, i, o: trace_dtypes.update(t.dtype for t in learner._traces.values()))
        losses, updates = [], None
        for x, y in _data(batches=3):
            losses.append(learner.step(x, y).loss)
            if updates is None:  # after one batch (T optimizer steps), before spike flips compound
                updates = [(p - p0).detach().flatten() for p, p0 in zip(model.parameters(), initial)]
        handle.remove()
        results[autocast] = (losses, updates, linear_dtypes, trace_dtypes)
    assert results[None][2] == {torch.float32} and results[torch.bfloat16][2] == {torch.bfloat16}
    assert results[torch.bfloat16][3] == {torch.float32}  # traces accumulate in float32 under bf16
    fp32, bf16 = results[None], results[torch.bfloat16]
    # the first batch closely; later ones drift as spike flips compound over T optimizer steps per batch
    for batch, (a, b) in enumerate(zip(fp32[0], bf16[0])):
        assert abs(a - b) < (0.02 if batch == 0 else 0.1) * abs(a)
    # the update of the whole model closely; each layer's (a few dozen active weights in this small net,
    # where one spike flipped by bfloat16 rounding moves a layer's cosine by a few hundredths) loosely
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(torch.cat(fp32[1]), torch.cat(bf16[1]), 0)) > 0.98
    for a, b in zip(fp32[1], bf16[1]):
        assert float(cosine(a, b, 0)) > 0.9
        assert not torch.equal(a, b)  # bf16 really ran


def test_tp_grad_scaler_steps_and_updates_at_every_time_step():
    model, reference = _tp_model("s"), _tp_model("s")
    scaler = _cpu_scaler(init_scale=2.0 ** 4, growth_interval=1)
    learner = _tp_learner(model, "concat", scaler=scaler)
    ref_learner = _tp_learner(reference, "concat")
    (x, y), = _data()
    stats = learner.step(x, y)
    ref_learner.step(x, y)
    assert stats.skipped_steps == []
    assert scaler.get_scale() == 2.0 ** (4 + T)  # TP takes T optimizer steps per batch: T updates
    for a, b in zip(model.parameters(), reference.parameters()):  # unscaled before each step: same updates
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert learner.state_dict()["scaler"]["scale"] == scaler.get_scale()


def test_tp_grad_scaler_overflow_skips_only_that_step():
    model, reference = _tp_model("s"), _tp_model("s")
    scaler = _cpu_scaler(init_scale=2.0 ** 10, growth_interval=1000)
    learner = _tp_learner(model, "concat", scaler=scaler)
    calls = []

    def overflow_at_step_2(grad):  # an infinite gradient in step 2's backward, as a float16 overflow gives
        calls.append(1)
        return grad * float("inf") if len(calls) == 3 else grad

    handle = model[2].weight.register_hook(overflow_at_step_2)
    (x, y), = _data()
    stats = learner.step(x, y)
    handle.remove()
    assert stats.skipped_steps == [2]
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the skipped step changed nothing: the same as a reference that never takes step 2's update
    ref_learner = _tp_learner(reference, "concat")
    ref_step = ref_learner.optimizer.step
    taken = []

    def step_except_2(*args, **kwargs):
        taken.append(1)
        return None if len(taken) == 3 else ref_step(*args, **kwargs)

    ref_learner.optimizer.step = step_except_2
    ref_learner.step(x, y)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero-change", "online"])
def test_a_compiled_model_gets_the_same_gradients_without_untraceable_calls(mode):
    """torch.compile around a wrapped model (zero-change) or wrapped (online): the same SLTT gradients as
    without it, and Dynamo meets nothing of ours that it cannot trace (the packer stands aside before it
    asks torch anything). aot_eager runs Dynamo and AOTAutograd without compiling kernels, to stay quick."""
    import warnings

    from spikingjelly.activation_based import functional

    from tests.models import sj_conv

    pytest.importorskip("torch._dynamo")
    x, y = (torch.rand(4, 3, 2, 8, 8) < 0.3).float(), torch.randint(0, 5, (3,))
    try:  # torch 2.1's Dynamo cannot compile SpikingJelly 0.0.0.0.14's layers, wrapped or not
        torch.compile(sj_conv("m"), backend="aot_eager")(x)
    except Exception as exc:  # pragma: no cover - old torch
        pytest.skip(f"this torch cannot compile the plain model: {type(exc).__name__}")
    finally:
        torch._dynamo.reset()

    def gradients(compiled):
        torch.manual_seed(0)
        model = sj_conv("m")
        if mode == "zero-change":
            learner = slr.wrap(model, rule="sltt")
            run = torch.compile(model, backend="aot_eager") if compiled else model
            torch.nn.functional.cross_entropy(run(x).mean(0), y).backward()
            functional.reset_net(model)
        else:
            target = torch.compile(model, backend="aot_eager") if compiled else model
            learner = slr.wrap(target, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
            learner.step(x, y)
        learner.unwrap()
        return [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = gradients(True)
    torch._dynamo.reset()
    assert not [w for w in caught if "Dynamo does not know how to trace" in str(w.message)]
    for a, b in zip(gradients(False), compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- gradient clipping ---------------------------------------------------------------------------
def _grad_norms_at_each_optimizer_step(optimizer):
    """Record the total 2-norm of the gradients that each optimizer step applies."""
    norms = []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return norms


def test_sltt_clip_grad_norm_scales_the_batch_gradient_as_a_plain_loop_would():
    (x, y), = _data()
    reference = _fresh_model("s")
    slr.wrap(reference, rule="sltt", optimizer=torch.optim.SGD(reference.parameters(), lr=0.0)).step(x, y)
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    limit = norm / 4
    model = _fresh_model("s")
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = _grad_norms_at_each_optimizer_step(optimizer)
    slr.wrap(model, rule="sltt", optimizer=optimizer, clip_grad_norm=limit).step(x, y)
    factor = limit / (norm + 1e-6)  # torch's clip_grad_norm_ divides by the norm plus 1e-6
    assert seen == [pytest.approx(norm * factor, rel=1e-5)]
    for p, p0, g in zip(model.parameters(), initial, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * factor * g, rtol=1e-5, atol=1e-7)


def test_sltt_clip_grad_norm_leaves_small_gradients_alone():
    (x, y), = _data()
    runs = []
    for clip in (None, 1e6):
        model = _fresh_model("s")
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.5), clip_grad_norm=clip).step(x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_tp_clip_grad_norm_clips_every_time_steps_update():
    (x, y), = _data()
    model = _tp_model("s")
    learner = _tp_learner(model, "concat", clip_grad_norm=1e-3)
    seen = _grad_norms_at_each_optimizer_step(learner.optimizer)
    learner.step(x, y)
    assert len(seen) == T and all(n <= 1e-3 * (1 + 1e-5) for n in seen)
    unclipped = _tp_model("s")
    learner = _tp_learner(unclipped, "concat")
    free = _grad_norms_at_each_optimizer_step(learner.optimizer)
    learner.step(x, y)
    assert max(free) > 10 * 1e-3  # the limit was binding


@pytest.mark.parametrize("rule", ["sltt", "tp"])
def test_clip_grad_norm_applies_to_unscaled_gradients(rule):
    # with a GradScaler the gradients are unscaled first, as torch's AMP recipe says: clipping the scaled
    # ones would leave the step 1/scale times the limit
    (x, y), = _data()
    model = _fresh_model("s") if rule == "sltt" else _tp_model("s")
    scaler = _cpu_scaler(init_scale=2.0 ** 10)
    if rule == "sltt":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = _grad_norms_at_each_optimizer_step(optimizer)
        slr.wrap(model, rule="sltt", optimizer=optimizer, scaler=scaler, clip_grad_norm=1e-3).step(x, y)
    else:
        learner = _tp_learner(model, "concat", scaler=scaler, clip_grad_norm=1e-3)
        seen = _grad_norms_at_each_optimizer_step(learner.optimizer)
        learner.step(x, y)
    assert seen and all(n == pytest.approx(1e-3, rel=1e-4) for n in seen)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_bad_clip_grad_norm_is_refused(bad):
    model = _fresh_model("s")
    with pytest.raises(slr.WrapError, match="clip_grad_norm must be a positive number"):
        slr.wrap(model, rule="sltt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), clip_grad_norm=bad)
    with pytest.raises(slr.WrapError, match="clip_grad_norm must be a positive number"):
        _tp_learner(_tp_model("s"), "concat", clip_grad_norm=bad)
    with pytest.raises(slr.WrapError, match="needs online mode.*clip_grad_norm_"):
        slr.wrap(model, rule="sltt", clip_grad_norm=1.0)
    assert slr.learner_of(model) is None
