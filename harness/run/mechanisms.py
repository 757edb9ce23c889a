"""The dictionary mechanisms (`moco.key_encoder`): what each one implies, in one table.

He et al. 2019 compare three ways of building the contrastive dictionary (Sec. 3.2, Fig. 2) and
ablate a fourth, encoder sharing (the paper's m = 0). Whether a mechanism has a key encoder of its
own, where its keys and negatives come from and which settings it never reads are facts read by the
model (`harness.model.moco`), validation (`run/config.py`), a run's identity (`run/identity.py`), the
dictionary diagnostics and the plans (`planning/studyfile.py`). They live here only: a new mechanism
is one row (plus its type in the config and its code in the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harness.run.errors import ConfigError

Keys = Literal["key_encoder", "query_encoder", "query_encoder_with_grad", "bank"]
Negatives = Literal["queue", "batch", "bank"]


@dataclass(frozen=True)
class Mechanism:
    name: str
    keys: Keys  # what encodes the keys: a separate momentum encoder, the query encoder, or a stored bank
    negatives: Negatives  # the queue of past keys, the other keys of the batch, or K draws from the bank
    ignores: tuple[str, ...]  # settings never read: not part of a run's identity
    summary: str

    @property
    def momentum_encoder(self) -> bool:
        """A key encoder of its own, updated as theta_k <- m theta_k + (1 - m) theta_q."""
        return self.keys == "key_encoder"

    @property
    def has_queue(self) -> bool:
        """Keys enqueued every step: K must be a multiple of the keys per step."""
        return self.negatives == "queue"

    @property
    def k_is_batch(self) -> bool:
        """K is not a setting: the negatives are the rest of the batch (the paper's end-to-end)."""
        return self.negatives == "batch"

    @property
    def consistent_by_construction(self) -> bool:
        """Keys made by the encoder in use at this step: key consistency is 1, not measured."""
        return self.keys == "query_encoder_with_grad"


MECHANISMS: dict[str, Mechanism] = {m.name: m for m in (
    Mechanism("momentum", keys="key_encoder", negatives="queue",
              ignores=("moco.bank_momentum",),
              summary="MoCo: a momentum key encoder and a queue of K keys (large and consistent)"),
    Mechanism("shared", keys="query_encoder", negatives="queue",
              ignores=("moco.momentum", "moco.bank_momentum"),  # no key encoder to average into
              summary="keys from the query encoder under stop-gradient, with the queue (the paper's m = 0)"),
    Mechanism("end_to_end", keys="query_encoder_with_grad", negatives="batch",
              ignores=("moco.momentum", "moco.bank_momentum", "moco.queue_size"),  # K is the batch
              summary="keys with gradient, the batch's other keys as negatives (consistent, K = batch)"),
    Mechanism("memory_bank", keys="bank", negatives="bank",
              ignores=("moco.momentum",),  # keys: the bank (its K draws and bank_momentum count)
              summary="Wu et al. 2018: one stored feature per training image, K drawn per step (large, "
                      "inconsistent)"),
)}


# MoCo's own. Older format: configs written before moco.key_encoder existed (dab95ca, 2026-11-29) mean it;
# the committed examples hold such configs, so this reading stays while they do.
DEFAULT: Literal["momentum"] = "momentum"


def mechanism(name: str) -> Mechanism:
    """The row of `moco.key_encoder`; a clear error for a name the table does not hold."""
    if name not in MECHANISMS:
        raise ConfigError(f"moco.key_encoder: {name!r} is not a dictionary mechanism; "
                          f"choose one of {', '.join(MECHANISMS)}.")
    return MECHANISMS[name]
