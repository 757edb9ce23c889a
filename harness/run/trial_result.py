"""What a finished run directory says about its trial: outcome, objective value and user attributes.

Read the same way by the driver (for jobs it submitted) and by workers (for trials they ran).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.run import evaluations, runio
from harness.run import trial_record as record
from harness.run.outcome import Outcome


@dataclass
class TrialResult:
    outcome: Outcome
    value: float | None
    attrs: dict = field(default_factory=dict)
    reason: str | None = None
    probe: dict | None = None  # the trial's probe result as read (its settings and seconds), None: none yet


def _attempt_attrs(run_dir: Path) -> dict:
    attempts = runio.read_jsonl(run_dir / "attempts.jsonl")
    if not attempts:
        return {}
    return {"host": attempts[-1].get("host"), "attempts": len(attempts),
            "job_ids": ",".join(str(a.get("job_id")) for a in attempts)}


CONFIGURED = "configured"


def read_trial_result(run_dir: Path, objective: str, gpus: int = 0, probe: dict | str | None = CONFIGURED) -> TrialResult:
    """`probe`: the probe settings whose result is the trial's (harness.run.evaluations.of the trial's
    config; None: no probe); CONFIGURED: the protocol and settings the run's config.yaml names."""
    status = runio.read_status(run_dir)
    outcome = Outcome.of_run(status.get("status"))
    attrs = {"epochs": status.get("epoch"), "final_loss": status.get("loss"),
             "knn_top1": status.get("knn_top1"), **_attempt_attrs(run_dir)}
    result = (evaluations.configured_result(run_dir) if probe == CONFIGURED
              else evaluations.find(run_dir, probe) if isinstance(probe, dict) else None)
    if result is not None:
        attrs.update(probe_top1=result["top1"], probe_top5=result["top5"], probe_protocol=result["protocol"],
                     pixel_floor_top1=result.get("pixel_floor_top1"))
    identity = runio.read_json(run_dir / "identity.json")
    if identity:
        attrs[record.IDENTITY] = identity["digest"]
    # Training epochs and the final probe: the trial's devices are held for both (in a DDP trial the
    # other ranks are released from collectives during the probe, not from the job's allocation).
    probe_seconds = result.get("seconds", 0) if result is not None else 0
    hours = (sum(r.get("epoch_seconds", 0) for r in runio.read_jsonl(run_dir / "metrics.jsonl")
                 if r.get("kind") == "epoch") + probe_seconds) / 3600
    attrs.update(hours=hours, gpu_hours=hours * gpus)
    value, reason = None, None
    if outcome is Outcome.COMPLETED:
        value = attrs.get(objective)
        if value is None:
            outcome, reason = Outcome.FAILED, f"completed without {objective}"
    elif outcome is Outcome.DIVERGED:
        reason = f"diverged: the loss became NaN/inf (step {status.get('global_step')})"
    attrs = {k: v for k, v in {record.OUTCOME: outcome.value, **attrs}.items() if v is not None}
    return TrialResult(outcome, value, attrs, reason, result)
