"""A trial's record in Optuna: the names of the user attributes the harness keeps on each trial and
study, in one place. The driver, the workers, the plans, the status and the reports read and write
them by these names (`record.RUN_DIR`, never the string), so a field is renamed or found here.

The metrics a finished run reports (`probe_top1`, `knn_top1`, `final_loss`, `epochs`, ...) are
recorded under their own names, the objective's vocabulary (harness.run.trial_result).
"""
from __future__ import annotations

# -- on each trial ------------------------------------------------------------------------------
KEY = "key"  # the point: factor=level,...,seed=N; also its run directory's name
RUN_DIR = "run_dir"  # the run directory, relative to the study's directory (runs/<key>)
EXECUTOR = "executor"  # who runs it: local | slurm | debug (driver), worker, or SHARED
SHARED = "shared"  # EXECUTOR's value for a run another study finished: reused, not trained here
#   (the other "shared" of this project is encoder sharing, moco.key_encoder=shared; see the glossary)
JOB_ID = "job_id"  # the scheduler's job id (a packed job's, for each of its trials)
SUBMITTED = "submitted"  # time.time() at submission: which jobs of a re-attached driver are its own
NEVER_RAN = "never_ran"  # failed before training started (lost job file): no retry is spent on it
OUTCOME = "outcome"  # harness.run.outcome.Outcome's value: FAIL told apart (diverged, crashed, ...)
FAILURE_REASON = "failure_reason"  # one line: why, for the report
SHARED_FROM = "shared_from"  # a SHARED trial: the run directory it reuses, relative to the results
SHARED_HOURS = "shared_hours"  # a SHARED trial: the training hours it did not repeat
HOURS = "hours"  # training (and final probe) hours of the run, 0 for a SHARED trial
GPU_HOURS = "gpu_hours"
IDENTITY = "identity"  # the run's identity digest (harness.run.identity)
EVAL_JOB_ID = "eval_job_id"  # with resources.eval: the evaluation job of a pretrained run (the trial waits on it)
EVAL_SUBMITTED = "eval_submitted"  # time.time() when that evaluation job was submitted
EVAL_TRIES = "eval_tries"  # evaluation jobs submitted for the trial so far (retried up to the study's retries)

# -- on the study -------------------------------------------------------------------------------
SIGNATURE = "signature"  # how it was started: recipe, --set overrides, the study file's text
OBJECTIVE = "objective"  # the metric the study optimises, as it was when the study began
