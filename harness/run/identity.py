"""A run's identity: what it computes, as a digest of its config minus what only changes how it
executes (RUNTIME_ONLY), how it is evaluated (EVALUATION) or what its dictionary mechanism never reads (`Mechanism.ignores`). Two configs with one
identity are one run: shared between studies, resumed under other runtime settings. Pure functions
of a config's dict (dotted keys), so old configs on disk are read the same way."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from harness.run.mechanisms import DEFAULT, MECHANISMS


def nest(key: str, value: Any) -> dict:
    """'moco.momentum', 0.99 -> {'moco': {'momentum': 0.99}}: the one reading of a dotted key."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def get_dotted(data: dict, key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# ---------------------------------------------------------------- run identity

# Fields that change how a run executes but not what it computes; a run resumed under other values
# is the same run (each attempt records the values it ran with, see harness.training.pretrain). At most they
# change the order of floating-point sums, as any other machine would.
RUNTIME_ONLY = {
    "name": "a label: the same computation may serve several studies",
    "recipe": "a label: what the recipe set is in the other fields",
    "runtime.threads": "CPU threads: set from the cores a job gets, which differ between machines",
    "runtime.dist_timeout_s": "how long a DDP collective may wait before the run fails",
    "runtime.compile": "torch.compile: the same graph, fused",
    "runtime.channels_last": "memory layout of the activations",
    "runtime.checkpoint_every": "checkpoint cadence",
    "runtime.checkpoint_every_steps": "checkpoint cadence",
    "runtime.keep_checkpoints": "checkpoints kept on disk",
    "runtime.keep_epochs": "intermediate checkpoints kept on disk, for probes of the run part-way",
    "runtime.log_every": "how often the loss is read back and logged",
    "data.num_workers": "DataLoader processes; each image's augmentation is seeded by its index",
}

# How a run is evaluated: the kNN monitor, the dictionary diagnostics and the final probe read the run and
# never change it (tests/training/test_diagnostics.py trains with and without them: bit-identical). So
# no eval.* field is part of the identity: another probe or monitor shares the pretraining and only
# evaluates it, each probe's result kept under its own settings (harness.run.evaluations), each attempt's
# monitor settings in attempts.jsonl. Runs made while eval.* was part of it (before 2026-12-03) are found
# by the identity recomputed from their config.yaml (harness.planning.shared.RunIndex), as any run is.
EVALUATION = "eval"


def identity_of(data: dict) -> dict:
    """What a run computes: its config (as a dict) minus the runtime-only fields, its evaluation and the
    settings its dictionary mechanism never reads."""
    out = json.loads(json.dumps(data))  # a deep copy
    out.pop(EVALUATION, None)
    runtime = out.get("runtime")
    if isinstance(runtime, dict) and "auto" in (runtime.get("device"), runtime.get("precision")):
        # Older format: configs written before `auto` was resolved (resolve_execution, d86ad7d, 2026-12-01); can go
        # when no committed example or shared run holds one. Every such run trained on a CPU in fp32
        # (no run of this project had met a GPU), which is what its identity says now.
        if runtime.get("device") == "auto":
            runtime["device"] = "cpu"
        if runtime.get("precision") == "auto":
            runtime["precision"] = "bf16" if runtime["device"] == "cuda" else "fp32"
    # What the run's dictionary mechanism never reads (harness.run.mechanisms): two configs that differ only
    # there train the same run, so a study's end-to-end point at the recipe's K is another study's.
    mech = MECHANISMS.get(get_dotted(out, "moco.key_encoder", DEFAULT))
    for key in (*RUNTIME_ONLY, *(mech.ignores if mech else ())):
        *parents, leaf = key.split(".")
        node = get_dotted(out, ".".join(parents)) if parents else out
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def identity_digest(data: dict) -> str:
    """A short, stable digest of a run's identity (canonical JSON)."""
    text = json.dumps(identity_of(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two identities."""
    def flat(d: dict, prefix: str = "") -> dict:
        items: dict[str, Any] = {}
        for k, v in d.items():
            items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return items

    a, b = flat(identity_of(old)), flat(identity_of(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


