"""The MoCo step is exactly the paper's Algorithm 1."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.model.batchnorm import SplitBatchNorm
from harness.model.moco import MoCo
from harness.model.shuffle_bn import shuffle_single, unshuffle_single

DIM, K, BATCH = 8, 32, 8


def conv_encoder(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, DIM))


def make(key_encoder="momentum", m=0.9, T=0.2, shuffle_bn="split", symmetric=False, seed=0, bn=nn.BatchNorm2d):
    torch.manual_seed(seed)
    return MoCo(lambda: conv_encoder(bn), dim=DIM, queue_size=K, momentum=m, temperature=T,
                key_encoder=key_encoder, shuffle_bn=shuffle_bn, symmetric=symmetric)


def views(seed=1, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randn(n, 3, 6, 6, generator=g)


def sgd_step(model, x_q, x_k, lr=0.5):
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=lr, momentum=0.9)
    out = model(x_q, x_k)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out["loss"].item()


def test_key_encoder_starts_as_copy_without_gradients():
    model = make()
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad


def test_momentum_update_is_exact_ema_of_parameters_only():
    model = make(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    k_before = copy.deepcopy(model.encoder_k.state_dict())
    q_params = dict(model.encoder_q.named_parameters())
    model._momentum_update_key_encoder()
    for name, pk in model.encoder_k.named_parameters():
        expected = k_before[name] * 0.9 + q_params[name].detach() * (1.0 - 0.9)
        assert torch.equal(pk, expected), name
    # BN running statistics are not averaged: the key encoder keeps its own.
    for name, buf in model.encoder_k.named_buffers():
        assert torch.equal(buf, k_before[name]), name


def test_queue_is_fifo_and_pointer_wraps():
    model = make()
    batches = [F.normalize(torch.randn(BATCH, DIM), dim=1) for _ in range(K // BATCH + 1)]
    for i, keys in enumerate(batches[:-1]):
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == ((i + 1) * BATCH) % K
        assert torch.equal(model.queue[:, i * BATCH:(i + 1) * BATCH], keys.T)
    assert int(model.queue_ptr) == 0  # wrapped
    model._dequeue_and_enqueue(batches[-1])  # overwrites the oldest (the first batch)
    assert torch.equal(model.queue[:, :BATCH], batches[-1].T)
    assert torch.equal(model.queue[:, BATCH:2 * BATCH], batches[1].T)


def test_logits_put_positive_first_divide_by_T_and_loss_is_cross_entropy():
    model = make(T=0.2)
    q = F.normalize(torch.randn(BATCH, DIM), dim=1)
    k = F.normalize(torch.randn(BATCH, DIM), dim=1)
    loss, logits = model._infonce(q, k)
    assert logits.shape == (BATCH, 1 + K)
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.2, atol=1e-6)
    assert torch.allclose(logits[:, 1:], q @ model.queue / 0.2, atol=1e-6)
    # cross-entropy from scratch, label 0 for every row
    manual = (-logits[:, 0] + torch.logsumexp(logits, dim=1)).mean()
    assert torch.allclose(loss, manual, atol=1e-6)


def test_forward_uses_queue_before_the_step_then_enqueues_keys():
    model = make()
    queue_before = model.queue.clone()
    x_q, x_k = views()
    captured = {}
    original = model._infonce

    def spy(q, k):
        captured["queue_seen"] = model.queue.clone()
        captured["k"] = k.detach().clone()
        return original(q, k)

    model._infonce = spy
    model(x_q, x_k)
    assert torch.equal(captured["queue_seen"], queue_before)
    assert torch.equal(model.queue[:, :BATCH], captured["k"].T)
    assert torch.equal(model.queue[:, BATCH:], queue_before[:, BATCH:])
    assert int(model.queue_ptr) == BATCH


def test_no_gradient_reaches_the_momentum_key_encoder():
    model = make("momentum")
    out = model(*views())
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_end_to_end_gradient_flows_through_keys():
    model = make("end_to_end")
    x_q, x_k = views()
    x_k.requires_grad_(True)
    out = model(x_q, x_k)
    out["loss"].backward()
    assert x_k.grad is not None and x_k.grad.abs().sum() > 0
    assert not hasattr(model, "queue")


def test_end_to_end_negatives_are_the_other_keys_of_the_batch():
    model = make("end_to_end", T=0.5)
    q = F.normalize(torch.randn(BATCH, DIM), dim=1)
    k = F.normalize(torch.randn(BATCH, DIM), dim=1)
    _, logits = model._infonce(q, k)
    assert logits.shape == (BATCH, BATCH)  # 1 positive + B - 1 negatives
    sim = q @ k.T / 0.5
    for i in range(BATCH):
        assert torch.allclose(logits[i, 0], sim[i, i])
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        assert torch.allclose(logits[i, 1:], others)


def test_shared_stops_gradient_through_keys():
    model = make("shared")
    x_q, x_k = views()
    x_k.requires_grad_(True)
    model(x_q, x_k)["loss"].backward()
    assert x_k.grad is None


def test_momentum_zero_gives_the_same_losses_as_shared():
    a, b = make("momentum", m=0.0), make("shared")
    losses_a, losses_b = [], []
    for step in range(4):
        x_q, x_k = views(seed=10 + step)
        torch.manual_seed(step)
        losses_a.append(sgd_step(a, x_q, x_k))
        torch.manual_seed(step)
        losses_b.append(sgd_step(b, x_q, x_k))
    assert losses_a == losses_b
    assert torch.equal(a.queue, b.queue)


def test_symmetric_loss_adds_both_directions_and_enqueues_both_key_sets():
    """v3-style symmetric loss: ctr(q1, k2) + ctr(q2, k1), both against the queue as it was before the
    step, then both key sets enqueued. Checked against a hand-written computation (no Shuffle BN, so
    nothing random)."""
    model = make(symmetric=True, shuffle_bn="none")
    ref = copy.deepcopy(model)
    x_1, x_2 = views()
    out = model(x_1, x_2)

    def ctr(x_q, x_k):
        q = F.normalize(ref.encoder_q(x_q), dim=1)
        with torch.no_grad():
            k = F.normalize(ref.encoder_k(x_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ ref.queue], dim=1) / 0.2
        return F.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long)), k

    loss_12, k_2 = ctr(x_1, x_2)  # key encoder == query encoder at the start: the EMA leaves it as is
    loss_21, k_1 = ctr(x_2, x_1)
    assert out["loss"].item() == pytest.approx((loss_12 + loss_21).item(), rel=1e-5)
    assert int(model.queue_ptr) == 2 * BATCH
    assert torch.allclose(model.queue[:, :BATCH], k_2.T, atol=1e-5)  # the first direction's keys first
    assert torch.allclose(model.queue[:, BATCH:2 * BATCH], k_1.T, atol=1e-5)
    assert torch.equal(model.queue[:, 2 * BATCH:], ref.queue[:, 2 * BATCH:])


def test_split_shuffle_then_unshuffle_restores_order():
    x = torch.arange(16.0).view(16, 1)
    shuffled, undo = shuffle_single(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(unshuffle_single(shuffled, undo), x)


def test_split_shuffle_bn_hides_the_order_from_bn_and_returns_keys_in_order():
    from harness.model.shuffle_bn import encode_shuffled

    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 6, 6)
    linear = nn.Linear(3 * 6 * 6, DIM)
    per_sample = lambda t: linear(t.flatten(1))  # noqa: E731  (no BN: order must not matter at all)
    torch.manual_seed(1)
    assert torch.equal(encode_shuffled(per_sample, x, "split"), per_sample(x))
    split_bn = conv_encoder(lambda c: SplitBatchNorm(c, num_splits=2))  # BN per half of the batch
    torch.manual_seed(1)
    shuffled = encode_shuffled(split_bn, x, "split")
    assert not torch.allclose(shuffled, split_bn(x), atol=1e-4)  # the halves mixed other samples


def test_split_batchnorm_with_one_split_equals_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    plain, split = nn.BatchNorm2d(4), SplitBatchNorm(4, num_splits=1)
    split.load_state_dict(plain.state_dict())
    assert torch.equal(plain(x), split(x))
    assert torch.equal(plain.running_mean, split.running_mean)
    assert torch.equal(plain.running_var, split.running_var)


def test_split_batchnorm_normalises_each_split_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    x[1::2] += 5.0  # split 1 (odd samples) has a different mean
    bn = SplitBatchNorm(3, num_splits=2)
    out = bn(x)
    for s in range(2):
        part = out[s::2]
        assert torch.allclose(part.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    expected = 0.1 * torch.stack([x[0::2].mean((0, 2, 3)), x[1::2].mean((0, 2, 3))]).mean(0)
    # Each split keeps its own estimate; the shared one (their mean) is what a state dict and evaluation read.
    assert torch.allclose(bn.running_mean_split.view(2, 3), 0.1 * torch.stack([x[0::2].mean((0, 2, 3)),
                                                                              x[1::2].mean((0, 2, 3))]), atol=1e-5)
    bn.eval()  # (a state dict reads the same mean: the next test)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_split_batchnorm_keeps_the_colabs_running_estimates_without_averaging_every_step():
    """Per-split running estimates, averaged when read, follow the Colab's recursion (repeat the shared
    estimate into the splits, update, average back: every step) to float rounding, over many steps;
    a state dict written before them loads with every split starting from the shared estimate."""
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=4)
    mean, var = torch.zeros(3), torch.ones(3)
    for step in range(50):
        x = torch.randn(16, 3, 4, 4) * (1 + step % 3) + step % 5
        bn(x)
        parts = x.view(4, 4, 3, 4, 4).transpose(0, 1)  # sample n in split n % 4: parts[s] is split s
        mean = (0.9 * mean + 0.1 * parts.mean((1, 3, 4))).mean(0)  # the Colab: repeat, update, average back
        var = (0.9 * var + 0.1 * parts.var((1, 3, 4), correction=1)).mean(0)  # unbiased, as batch_norm keeps
    state = bn.state_dict()
    assert torch.allclose(state["running_mean"], mean, atol=1e-5) and torch.allclose(state["running_var"], var, atol=1e-4)
    old = {k: v for k, v in state.items() if "_split" not in k}
    fresh = SplitBatchNorm(3, num_splits=4)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.running_mean_split, state["running_mean"].repeat(4))


def test_split_batchnorm_keeps_channels_last_and_normalises_as_in_nchw():
    """A channels_last batch (the layout on a GPU) is normalised in its own layout, without folding
    the splits into channels (a copy to NCHW, and one back at the next convolution): same output,
    gradients and running estimates as the NCHW path, to float rounding."""
    torch.manual_seed(0)
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    nchw, strided = SplitBatchNorm(6, num_splits=4), SplitBatchNorm(6, num_splits=4)
    with torch.no_grad():
        nchw.weight.uniform_(0.5, 1.5), nchw.bias.uniform_(-1, 1)
    strided.load_state_dict(nchw.state_dict())
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    out_cl, out = strided(x_cl), nchw(x_nchw)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert torch.allclose(out_cl, out, atol=1e-5)
    weights = torch.randn_like(out)
    (out_cl * weights).sum().backward()
    (out * weights).sum().backward()
    assert torch.allclose(x_cl.grad, x_nchw.grad, atol=1e-5)
    assert torch.allclose(strided.weight.grad, nchw.weight.grad, atol=1e-4)
    assert torch.allclose(strided.bias.grad, nchw.bias.grad, atol=1e-4)
    assert torch.allclose(strided.running_mean_split, nchw.running_mean_split, atol=1e-6)
    assert torch.allclose(strided.running_var_split, nchw.running_var_split, atol=1e-5)
    assert strided.num_batches_tracked == nchw.num_batches_tracked == 1


@pytest.mark.parametrize("key_encoder", ["momentum", "shared", "end_to_end"])
def test_every_key_encoder_trains_with_split_bn(key_encoder):
    model = make(key_encoder, bn=lambda c: SplitBatchNorm(c, num_splits=2))
    losses = [sgd_step(model, *views(seed=3), lr=0.1) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_compiled_encoders_train_like_eager_ones_and_keep_checkpoint_names():
    """runtime.compile: the same losses, queue and parameter names (checkpoints load either way).
    Compiled through dynamo and AOT autograd without inductor's code generation, which alone takes a
    minute on a 2-core CPU: what the harness controls (modules compiled in place, graphs captured,
    gradients through them) is the same; inductor's own kernels are the device check's part on a GPU."""
    from harness.data.datasets import load_tensors, pretrain_views
    from harness.model.moco import build_moco, compile_encoders
    from harness.run.config import make_config

    cfg = make_config("fmnist-tiny", ["data.train_subset=128", "data.test_subset=64", "optim.batch_size=32",
                                      "moco.queue_size=64", "moco.bn_splits=4"])
    views = pretrain_views(cfg, torch.device("cpu"), splits=load_tensors(cfg))
    batches = list(views.epoch(0))[:3]
    torch.manual_seed(0)
    eager = build_moco(cfg)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled, backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(1)  # the same Shuffle-BN permutations
        losses[name] = []
        for x_q, x_k in batches:
            loss = model(x_q, x_k)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    # Something was compiled: dynamo captured graphs of both encoders (eager runs capture none).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert losses["eager"] == pytest.approx(losses["compiled"], rel=1e-3)
    assert torch.allclose(eager.queue, compiled.queue, atol=1e-4)
    assert list(eager.state_dict()) == list(compiled.state_dict())


# ---------------------------------------------------------------- the memory bank (Fig. 2b, Fig. 3)

N_BANK = 40


def make_bank(T=0.2, seed=0):
    torch.manual_seed(seed)
    return MoCo(conv_encoder, dim=DIM, queue_size=K, temperature=T, key_encoder="memory_bank", bank_size=N_BANK)


def test_memory_bank_draw_loss_and_update_match_a_hand_written_reference():
    model = make_bank()
    bank_before = model.bank.clone()
    assert torch.allclose(bank_before.norm(dim=1), torch.ones(N_BANK), atol=1e-5)  # random unit vectors
    x_q, x_k = views()
    index = torch.tensor([3, 7, 0, 12, 39, 21, 5, 30])
    torch.manual_seed(123)
    out = model(x_q, x_k, index)
    # Reference: the same draw (uniform, with replacement, K of them), positives = the images' own entries.
    torch.manual_seed(123)
    q = F.normalize(model.encoder_q(x_q), dim=1).detach()
    draw = torch.randint(N_BANK, (K,))
    logits = torch.cat([(q * bank_before[index]).sum(1, keepdim=True), q @ bank_before[draw].T], dim=1) / 0.2
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, torch.zeros(BATCH, dtype=torch.long)).item(),
                                               rel=1e-5)
    # Update: the batch's entries move halfway to q and are renormalised; the others are untouched.
    expected = F.normalize(0.5 * bank_before[index] + 0.5 * q, dim=1)
    assert torch.allclose(model.bank[index], expected, atol=1e-6)
    others = torch.ones(N_BANK, dtype=torch.bool)
    others[index] = False
    assert torch.equal(model.bank[others], bank_before[others])


def test_memory_bank_trains_only_the_query_encoder_and_is_checkpointed():
    model = make_bank()
    assert not hasattr(model, "encoder_k") and not hasattr(model, "queue") and "bank" in model.state_dict()
    x_q, x_k = views()
    out = model(x_q, x_k, torch.arange(BATCH))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert not model.bank.requires_grad
    restored = make_bank(seed=5)
    restored.load_state_dict(model.state_dict())  # resume: the bank comes back exactly
    assert torch.equal(restored.bank, model.bank)


@pytest.mark.parametrize("stride,down", [(1, False), (2, True)])
def test_the_tiny_resnets_basic_block_is_torchvisions(stride, down):
    """harness.model.backbones.BasicBlock (so that CPU runs need not import torchvision) builds the same
    parameters from a seed, under the same names, and computes the same outputs and gradients."""
    from torchvision.models.resnet import BasicBlock as Reference

    from harness.model.backbones import BasicBlock

    def build(cls):
        torch.manual_seed(0)
        shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, stride, bias=False), nn.BatchNorm2d(8)) if down else None
        return cls(4 if down else 8, 8, stride, shortcut, norm_layer=nn.BatchNorm2d)

    ours, ref = build(BasicBlock), build(Reference)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(4, 4 if down else 8, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = [m(x.clone().requires_grad_()) for m in (ours, ref)]
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), ref.parameters()))
