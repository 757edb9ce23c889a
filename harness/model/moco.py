"""MoCo (He et al. 2019, Algorithm 1; Chen et al. 2020 for v2): one module, read top to bottom.

Where the ablated factors act:
  m   (momentum)     -> `_momentum_update_key_encoder`
  K   (queue size)   -> `queue` buffer, `_dequeue_and_enqueue` (memory bank: K negatives drawn per step)
  tau (temperature)  -> `_infonce`
  encoder sharing    -> `encode_keys` (which encoder makes the keys, with or without gradient)
  dictionary         -> the memory bank: `_memory_bank_step` (the paper's Figure 2b and 3)

What each `key_encoder` implies (a key encoder of its own, a queue, where the negatives come from) is
its row in harness.run.mechanisms; this module acts on those facts.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from harness.model.distributed import concat_all_gather, concat_all_gather_with_grad, is_distributed, rank
from harness.model.shuffle_bn import encode_shuffled
from harness.run.mechanisms import DEFAULT, mechanism


class MoCo(nn.Module):
    def __init__(self, make_encoder: Callable[[], nn.Module], dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.07, key_encoder: str = DEFAULT,
                 shuffle_bn: str = "split", symmetric: bool = False, bank_size: int = 0, bank_momentum: float = 0.5):
        super().__init__()
        mech = self.mechanism = mechanism(key_encoder)
        if mech.negatives == "bank" and bank_size <= 0:
            raise ValueError(f"key_encoder={key_encoder!r} needs bank_size: the number of training images")
        self.m, self.T, self.K = momentum, temperature, queue_size
        self.key_encoder, self.shuffle_bn, self.symmetric = key_encoder, shuffle_bn, symmetric

        self.encoder_q = make_encoder()
        if mech.momentum_encoder:
            # theta_k starts as a copy of theta_q and is only ever changed by the momentum update.
            self.encoder_k = copy.deepcopy(self.encoder_q)
            for p in self.encoder_k.parameters():
                p.requires_grad_(False)
        if mech.negatives == "bank":
            # Wu et al. 2018 (InstDisc), as MoCo compared it (Sec. 3.2, Fig. 2b): one feature per
            # training image, random unit vectors at the start; a buffer, so checkpoints carry it.
            self.bank_m = bank_momentum
            self.register_buffer("bank", F.normalize(torch.randn(bank_size, dim), dim=1))
        elif mech.has_queue:
            # Buffers, so checkpoints carry the queue and its pointer.
            self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            # The pointer's value on the host: a step never reads the buffer back from the device (a
            # sync per step on a GPU). The buffer is what checkpoints carry; loading one sets this.
            self._ptr = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loading a checkpoint also sets the host's queue pointer, from the checkpoint's own (CPU) copy."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "queue_ptr" in state_dict:
            self._ptr = int(state_dict[prefix + "queue_ptr"])

    def dictionary_buffers(self) -> list[str]:
        """The dictionary's state (queue and pointer, or the bank): equal on every rank by construction
        (the same seed, the same gathered keys enqueued everywhere), so DDP need not broadcast it."""
        return [name for name, _ in self.named_buffers() if name in ("queue", "queue_ptr", "bank")]

    # -- Algorithm 1, step by step ------------------------------------------------------------

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only (BN statistics are the key
        encoder's own, from its own forward passes)."""
        k_params = list(self.encoder_k.parameters())
        q_params = list(self.encoder_q.parameters())
        # Two separately rounded products, as the official `k * m + q * (1 - m)` (no fused alpha).
        torch._foreach_mul_(k_params, self.m)
        torch._foreach_add_(k_params, torch._foreach_mul(q_params, 1.0 - self.m))

    def encode_keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """k = normalize(f_k(x_k)), encoded under Shuffle BN; normalised in fp32 (see _infonce). The one
        key encoding: the dictionary diagnostics re-encode stored keys' views with it."""
        if self.mechanism.keys == "query_encoder_with_grad":  # end-to-end: gradient flows through keys
            return F.normalize(encode_shuffled(self.encoder_q, x_k, self.shuffle_bn, differentiable=True).float(), dim=1)
        encoder = self.encoder_k if self.mechanism.momentum_encoder else self.encoder_q
        with torch.no_grad():  # momentum: no gradient to f_k; shared: stop-gradient (the paper's m = 0)
            return F.normalize(encode_shuffled(encoder, x_k, self.shuffle_bn).float(), dim=1)

    def _infonce(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, 1 + negatives), positive in column 0, divided by T; cross-entropy loss.
        Similarities in fp32 even under autocast: in bf16 a logit at T = 0.07 is rounded by ~0.06."""
        with torch.autocast(q.device.type, enabled=False):
            return self._infonce_fp32(q.float(), k.float())

    def _infonce_fp32(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # bmm and mm as Algorithm 1 writes them (einsum would add a dozen permutes and views per step)
        l_pos = _positive_logits(q, k)  # N x 1
        if self.mechanism.k_is_batch:
            # Negatives: every other key of the global batch (no queue).
            k_all = concat_all_gather_with_grad(k)
            sim = torch.mm(q, k_all.t())  # N x G
            n = q.shape[0]
            # Row i keeps columns 0..G-2, shifted past its own key (column rank * n + i): a gather
            # of a fixed shape (a boolean mask's selection would read its size back from the device).
            own = torch.arange(n, device=q.device).unsqueeze(1) + rank() * n
            others = torch.arange(sim.shape[1] - 1, device=q.device).unsqueeze(0).expand(n, -1)
            l_neg = sim.gather(1, others + (others >= own).long())  # N x (G - 1)
        else:
            # The queue as it was before this step: enqueue happens after both losses.
            l_neg = torch.mm(q, self.queue.clone().detach())  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), labels), logits

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest keys with this step's keys from every rank; advance the pointer."""
        keys = concat_all_gather(keys)
        batch = keys.shape[0]
        ptr = self._ptr
        assert self.K % batch == 0, "validated in config: K is a multiple of the keys per step"
        self.queue[:, ptr:ptr + batch] = keys.T.to(self.queue.dtype)
        self._ptr = (ptr + batch) % self.K
        self.queue_ptr.fill_(self._ptr)  # a fill from a host value: no read-back

    # -- the memory bank (Wu et al. 2018), the dictionary MoCo replaces ----------------------

    def _memory_bank_step(self, x_q: torch.Tensor, index: torch.Tensor):
        """Keys come from the bank, not from an encoder: the positive is the stored feature of the
        query's own image (InstDisc's v_i), the negatives K entries drawn uniformly at random (with
        replacement, as InstDisc's sampler; one draw per step, shared by the batch, the same on every
        rank). Stored features are as old as the last epoch that saw their image: large but
        inconsistent, the paper's point."""
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # similarities in fp32, as _infonce
        with torch.no_grad():
            positive = self.bank[index]  # N x C
            draw = torch.randint(self.bank.shape[0], (self.K,), device=q.device)
            if is_distributed():
                dist.broadcast(draw, src=0)  # every rank uses rank 0's draw
            negatives = self.bank[draw]  # K x C
        with torch.autocast(q.device.type, enabled=False):
            l_pos = _positive_logits(q, positive)
            l_neg = torch.mm(q, negatives.t())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._update_bank(index, q.detach())
        return F.cross_entropy(logits.float(), labels), logits

    @torch.no_grad()
    def _update_bank(self, index: torch.Tensor, q: torch.Tensor) -> None:
        """InstDisc's proximal update of the batch's own entries: v <- normalize(m_b v + (1 - m_b) q),
        m_b = 0.5; the whole global batch on every rank, so all ranks hold the same bank."""
        index, q = concat_all_gather(index), concat_all_gather(q)
        mixed = self.bank_m * self.bank[index] + (1.0 - self.bank_m) * q.to(self.bank.dtype)
        self.bank[index] = F.normalize(mixed, dim=1)

    def _one_direction(self, x_q: torch.Tensor, x_k: torch.Tensor):
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # N x C, with gradient; fp32 (see _infonce)
        k = self.encode_keys(x_k)  # N x C
        loss, logits = self._infonce(q, k)
        return loss, logits, k

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`index`: the batch's image indices in the training set (used by the memory bank only)."""
        if self.mechanism.negatives == "bank":  # x_k is not used: the bank supplies the keys
            loss, logits = self._memory_bank_step(x_q, index)
            return {"loss": loss, "accuracy": (logits.argmax(dim=1) == 0).float().mean().detach()}
        if self.mechanism.momentum_encoder:
            self._momentum_update_key_encoder()  # uses theta_q as left by the last SGD step
        loss, logits, k = self._one_direction(x_q, x_k)
        keys = k
        if self.symmetric:  # swap the crops; both losses see the same (old) queue
            loss_21, _, k_1 = self._one_direction(x_k, x_q)
            loss = loss + loss_21
            keys = torch.cat([k, k_1])
        if self.mechanism.has_queue:
            self._dequeue_and_enqueue(keys.detach())
        # Pretext accuracy: how often the positive wins (near 100 % hints at BN "cheating").
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def _positive_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q . k per row, N x 1: Algorithm 1's bmm(q.view(N, 1, C), k.view(N, C, 1))."""
    return torch.bmm(q.unsqueeze(1), k.unsqueeze(2)).view(-1, 1)


def compile_encoders(model: MoCo, backend: str = "inductor") -> None:
    """torch.compile the query and key encoders in place (nn.Module.compile): parameter names, hence
    checkpoints, and the momentum update over their parameters stay exactly as without it. Under DDP
    they are first called inside its forward, where dynamo splits each graph at DDP's gradient
    buckets, so the all-reduce still overlaps backward (tests/model/test_ddp.py)."""
    model.encoder_q.compile(backend=backend)
    if hasattr(model, "encoder_k"):
        model.encoder_k.compile(backend=backend)


def build_moco(cfg, bank_size: int | None = None) -> MoCo:
    """MoCo from a RunConfig (the encoder factory lives here so both encoders match).

    Args:
        cfg: a validated RunConfig (model, moco and data sections are read).
        bank_size: the training images, for a memory bank (default: the in-memory dataset's size).

    Returns:
        The MoCo module on the CPU, initialised from torch's current RNG state (callers seed it).

    Raises:
        ConfigError: a `moco.key_encoder` that is not in the mechanisms' table.
        ValueError: a memory bank without a size (an image-folder run whose size is not given).
    """
    from harness.model.backbones import Encoder, build_backbone
    from harness.run.datafiles import CHANNELS, pretrain_size

    mc = cfg.moco
    splits = mc.bn_splits if mc.shuffle_bn == "split" else 1

    def make_encoder() -> nn.Module:
        backbone = build_backbone(cfg.model.arch, cfg.model.stem, CHANNELS[cfg.data.dataset], splits,
                                  cfg.model.tiny_widths, cfg.model.tiny_stem_stride)
        return Encoder(backbone, mc.dim, mc.mlp)

    return MoCo(make_encoder, dim=mc.dim, queue_size=mc.queue_size, momentum=mc.momentum,
                temperature=mc.temperature, key_encoder=mc.key_encoder, shuffle_bn=mc.shuffle_bn,
                symmetric=mc.symmetric, bank_momentum=mc.bank_momentum,
                bank_size=(bank_size or pretrain_size(cfg) or 0) if mechanism(mc.key_encoder).negatives == "bank" else 0)
