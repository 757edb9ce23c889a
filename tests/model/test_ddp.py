"""The DDP Shuffle BN path, with two real CPU processes (gloo)."""
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import run_ranks
from timing import scaled
from torch import nn

from harness.model.distributed import wrap_ddp
from harness.model.moco import MoCo
from harness.model.shuffle_bn import encode_shuffled

DIM, K, PER_RANK = 8, 32, 4


class RecordingMoCo(MoCo):
    """Keeps the local keys handed to the enqueue, to compare with the queue afterwards."""

    def _dequeue_and_enqueue(self, keys):
        self.last_local_keys = keys.clone()
        super()._dequeue_and_enqueue(keys)


def encoder():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, DIM))


def worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights and queue on both ranks
    model = RecordingMoCo(encoder, dim=DIM, queue_size=K, momentum=0.9, temperature=0.2, shuffle_bn="ddp")
    ddp = wrap_ddp(model, torch.device("cpu"), model.dictionary_buffers())  # as a run wraps it
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different images per rank
    for _ in range(2):
        x_q, x_k = torch.randn(PER_RANK, 3, 5, 5, generator=g), torch.randn(PER_RANK, 3, 5, 5, generator=g)
        torch.manual_seed(rank)  # different local RNG: the permutation must still come from rank 0
        out = ddp(x_q, x_k)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    keys = [torch.empty_like(model.last_local_keys) for _ in range(world)]
    dist.all_gather(keys, model.last_local_keys)

    # Without BN, shuffle -> encode -> unshuffle must give exactly the unshuffled encoding.
    torch.manual_seed(rank)
    linear = nn.Linear(3 * 5 * 5, DIM)
    dist.broadcast(linear.weight.data, 0)
    dist.broadcast(linear.bias.data, 0)
    x = torch.randn(PER_RANK, 3, 5, 5, generator=g)
    flat = lambda t: linear(t.flatten(1))  # noqa: E731
    restored = torch.allclose(encode_shuffled(flat, x, "ddp"), flat(x), atol=1e-6)

    # With BatchNorm, the shuffle must change what each rank's BN sees: keys differ from an
    # unshuffled encoding (an identity permutation would give the same keys).
    model.train()
    torch.manual_seed(rank)
    x = torch.randn(PER_RANK, 3, 5, 5, generator=g)
    with torch.no_grad():
        mixed = not torch.allclose(encode_shuffled(model.encoder_k, x, "ddp"), model.encoder_k(x), atol=1e-4)

    results[rank] = {"queue": model.queue.clone(), "ptr": int(model.queue_ptr), "keys": torch.cat(keys),
                     "restored": restored, "mixed": mixed, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    dist.destroy_process_group()


def test_ddp_shuffle_bn_fills_identical_queues_with_the_global_batch(tmp_path):
    world = 2
    results = mp.Manager().dict()
    run_ranks(worker, (world, str(tmp_path / "init"), results), world)
    r0, r1 = results[0], results[1]
    assert torch.equal(r0["queue"], r1["queue"])
    global_batch = world * PER_RANK
    assert r0["ptr"] == r1["ptr"] == 2 * global_batch  # two steps of the global batch
    # The second step's keys of both ranks, in rank order, occupy the slots after the first step's.
    assert torch.equal(r0["queue"][:, global_batch:2 * global_batch], r0["keys"].T)
    assert torch.allclose(r0["keys"].norm(dim=1), torch.ones(global_batch), atol=1e-5)
    assert r0["restored"] and r1["restored"]
    assert r0["mixed"] and r1["mixed"]
    # After the steps both ranks hold the same query and key encoders (DDP averaged the gradients).
    params = [k for k in r0["state"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in params)


def bank_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial bank on both ranks
    model = MoCo(encoder, dim=DIM, queue_size=K, temperature=0.2, key_encoder="memory_bank", bank_size=20)
    ddp = wrap_ddp(model, torch.device("cpu"), model.dictionary_buffers())  # as a run wraps it
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        x = torch.randn(PER_RANK, 3, 5, 5, generator=g)
        index = torch.arange(PER_RANK) + PER_RANK * (2 * step + rank)  # each rank its own images
        torch.manual_seed(rank)  # different local RNG: the draw of negatives must still be rank 0's
        ddp(x, x, index)["loss"].backward()
    results[rank] = {"bank": model.bank.clone()}
    dist.destroy_process_group()


def test_ddp_memory_bank_is_the_same_on_every_rank_and_updated_for_the_global_batch(tmp_path):
    world = 2
    results = mp.Manager().dict()
    run_ranks(bank_worker, (world, str(tmp_path / "init"), results), world)
    torch.manual_seed(0)
    initial = MoCo(encoder, dim=DIM, queue_size=K, key_encoder="memory_bank", bank_size=20).bank
    b0, b1 = results[0]["bank"], results[1]["bank"]
    assert torch.equal(b0, b1)
    changed = (b0 != initial).any(dim=1)
    assert changed[:16].all() and not changed[16:].any()  # both ranks' images of both steps, nothing else


def broadcast_worker(rank, world, init_file, results):
    # a collective left waiting fails within the group's timeout (scaled by the machine's speed)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=scaled(30)))
    for key_encoder in ("momentum", "memory_bank"):
        torch.manual_seed(0)
        model = MoCo(encoder, dim=DIM, queue_size=K, temperature=0.2, key_encoder=key_encoder, bank_size=20)
        ddp = wrap_ddp(model, torch.device("cpu"), model.dictionary_buffers())
        dictionary = model.bank if key_encoder == "memory_bank" else model.queue
        with torch.no_grad():  # rank 1's copies made different: a broadcast from rank 0 would undo it
            dictionary.add_(rank)
            model.encoder_q[1].running_mean.add_(rank)
        x = torch.randn(PER_RANK, 3, 5, 5, generator=torch.Generator().manual_seed(rank))
        ddp(x, x, torch.arange(PER_RANK) + PER_RANK * rank)
        untouched = dictionary[8:] if key_encoder == "memory_bank" else dictionary[:, 8:]  # the step wrote 8 entries
        results[(rank, key_encoder)] = {
            "dictionary": untouched.clone(), "names": model.dictionary_buffers(),
            "bn_before_forward_was_rank_0s": bool((model.encoder_q[1].running_mean.abs() < 0.5).all())}
    dist.destroy_process_group()


def test_ddp_does_not_broadcast_the_queue_or_the_bank_but_still_the_batchnorm_statistics(tmp_path):
    """Before every forward DDP sends rank 0's buffers to the others (an ImageNet memory bank: 655 MB a
    step). The dictionary is equal on every rank by construction, so it is left out: a difference put
    into rank 1's copy survives a forward, while BatchNorm's statistics are still rank 0's."""
    results = mp.Manager().dict()
    run_ranks(broadcast_worker, (2, str(tmp_path / "init"), results), 2)
    for key_encoder, names in (("momentum", ["queue", "queue_ptr"]), ("memory_bank", ["bank"])):
        r0, r1 = results[(0, key_encoder)], results[(1, key_encoder)]
        assert r0["names"] == names
        assert (r1["dictionary"] - r0["dictionary"]).abs().min() > 0.5  # not overwritten
        assert r0["bn_before_forward_was_rank_0s"] and r1["bn_before_forward_was_rank_0s"]


def wide_encoder():
    """Over 1 MB of parameters in its head: DDP's first gradient bucket (1 MB) fills before the
    rest, so a graph split at bucket boundaries has at least two parts."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 600), nn.ReLU(), nn.Linear(600, 600), nn.ReLU(), nn.Linear(600, DIM))


def compile_worker(rank, world, init_file, results):
    from torch._dynamo.backends.registry import lookup_backend

    from harness.model.moco import compile_encoders

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=scaled(60)))
    graphs = []

    def counting_aot_eager(gm, example_inputs):  # aot_eager, counting the graphs it is given
        graphs.append(len(gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, example_inputs)

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MoCo(wide_encoder, dim=DIM, queue_size=K, momentum=0.9, temperature=0.2, shuffle_bn="ddp")
        if compiled:  # as a run: compiled in place first, then wrapped, first called inside DDP's forward
            compile_encoders(model, counting_aot_eager)
        ddp = wrap_ddp(model, torch.device("cpu"), model.dictionary_buffers())
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        losses[compiled] = []
        for _ in range(3):
            x_q, x_k = torch.randn(PER_RANK, 3, 5, 5, generator=g), torch.randn(PER_RANK, 3, 5, 5, generator=g)
            torch.manual_seed(0)
            out = ddp(x_q, x_k)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses[compiled].append(out["loss"].item())
    results[rank] = {"eager": losses[False], "compiled": losses[True], "graphs": graphs}
    dist.destroy_process_group()


def test_compiled_encoders_inside_ddp_train_as_eager_ones_and_split_at_the_gradient_buckets(tmp_path):
    """runtime.compile under DDP: the encoders are compiled in place and first run inside DDP's
    forward, where dynamo splits each graph at DDP's gradient-bucket boundaries (its DDPOptimizer),
    so a bucket's all-reduce starts while backward goes on through the layers before it. Losses
    equal the eager run's to 1e-5 relative (aot_eager: the same kernels, another graph), over 3 steps
    of 2 gloo ranks."""
    results = mp.Manager().dict()
    run_ranks(compile_worker, (2, str(tmp_path / "init"), results), 2)
    for rank in range(2):
        r = results[rank]
        assert r["compiled"] == pytest.approx(r["eager"], rel=1e-5), r
        # the query encoder's graph in two parts at least, the key encoder's (no gradients) in one:
        # two graphs in all without DDP's split
        assert len(r["graphs"]) >= 3, r["graphs"]
