"""MLflow, relayed by the driver: jobs never talk to the tracking server.

Compute nodes often cannot reach a lab's MLflow server, and a run that waits on one stalls. So, as
with pruning (harness.execution.pruning_relay), the driver relays: each round it reads the run
directories of the study's trials and sends the server what it has not seen yet. A study is an
experiment; a point (factors + seed) a run named by its key, with the factors and seed as params,
tagged `harness.level` (the factors alone: MLflow's "group by" gathers a level's seeds), the curves
of harness.run.curves as metrics, and the final probe. The report goes up as an artifact of a run
named `report`.

The server is the record of what was sent: on first contact (and after any failed request) the relay
asks it for each run's last step and epoch, and sends only later points, so a driver restarted, or a
request whose answer was lost, doubles nothing. An unreachable server costs one warning, never a
trial: the points wait in the run directories and go up once it answers again.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from harness.execution.optuna_adapter import COMPLETE, PRUNED, RUNNING
from harness.execution.storage import redact
from harness.run import curves, runio
from harness.run import trial_record as record

# A request gives up fast and is tried again next round: MLflow's own client retries 7 times with
# exponential backoff (minutes), which would stall the driver's rounds during an outage.
# Nor does it print a link per run ended: the driver names the experiment once.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
RETRY_S = 30.0  # after a failed request, the next try waits at most this long (the rounds go on meanwhile)
BATCH = 900  # metrics per request (the server takes at most 1000)
KEY_TAG, LEVEL_TAG, TRIAL_TAG = "harness.key", "harness.level", "harness.trial"
# A record's first series, one per kind of record (harness.run.curves): the server has a record when it
# has that point, because a record goes up whole in one request.
MARKS = {"step": "step/loss", "epoch": "epoch/loss"}
REPORT_RUN = "report"


def available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Run:
    """What the server has of one point's run (read from it, then kept up to date)."""
    run_id: str
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MARKS, -1))  # kind -> the last x sent
    final: bool = False
    ended_trial: int | None = None  # the trial whose end the run records (a retry of the point reopens it)
    seen: tuple | None = None  # (size, mtime) of metrics.jsonl when last read: unchanged, nothing new to send


@dataclass
class MlflowRelay:
    uri: str
    experiment: str  # the study's name
    study_dir: Path
    factors: list[str]
    retry_s: float = RETRY_S
    runs: dict[str, _Run] = field(default_factory=dict)
    _synced: bool = False
    _failed_at: float | None = None
    _warned: bool = False

    def __post_init__(self):
        if not available():
            from harness.run.errors import StudyError

            raise StudyError(f"--track {redact(self.uri)}: MLflow is not installed; pip install -e '.[track]' "
                             "(or drop --track / the study file's tracking.mlflow).")
        for name, value in CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id: str | None = None

    # -------------------------------------------------------------- the driver's calls
    def relay(self, trials: list[optuna.trial.FrozenTrial], now: bool = False) -> int | None:
        """Send what the server lacks of every trial's run; never raises. Returns the points sent, or
        None when the server did not answer (or is waited for: `now` tries at once)."""
        return self._patiently(lambda: self._relay(trials), now)

    def upload_report(self, report_dir: Path) -> bool:
        """The report directory (page, tables, figures, table.tex) as the `report` run's artifacts."""
        return bool(self._patiently(lambda: self._upload(report_dir), now=True))

    def missed(self, command: str) -> None:
        """The study ended with the server behind: how to catch up once it answers."""
        print(f"warning: the MLflow server {redact(self.uri)} did not get all of this study; once it answers, "
              f"`{command}` sends what it lacks (nothing twice).", file=sys.stderr, flush=True)

    def _patiently(self, work, now: bool):
        if not now and self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
            return None
        try:
            done = work()
        except Exception as exc:  # a server down, refusing or slow: the study goes on without it
            self._failed_at, self._synced = time.monotonic(), False  # re-read the server's side next time
            if not self._warned:
                print(f"warning: the MLflow server {redact(self.uri)} does not answer ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the study goes on, its points wait in "
                      f"the run directories and are sent once it answers (tried again every {self.retry_s:.0f} s).",
                      file=sys.stderr, flush=True)
                self._warned = True
            return None
        if self._warned:
            print(f"note: the MLflow server {redact(self.uri)} answers again; catching up.", file=sys.stderr, flush=True)
        self._failed_at, self._warned = None, False
        return done

    # -------------------------------------------------------------- the server's side
    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (found.experiment_id if found else
                                   self.client.create_experiment(self.experiment, tags={"harness.study_dir": str(self.study_dir)}))
            print(f"[study {self.experiment}] runs relayed to MLflow: {redact(self.uri)}, experiment "
                  f"'{self.experiment}' (id {self._experiment_id})", flush=True)
        return self._experiment_id

    def _sync(self) -> None:
        """What the server already has: each run's last step and epoch, its final metrics, its status."""
        experiment = self._experiment()
        self.runs = {}
        token = None
        while True:
            page = self.client.search_runs([experiment], max_results=1000, page_token=token)
            for run in page:
                key = run.data.tags.get(KEY_TAG)
                if key is None:
                    continue
                last = {kind: max((m.step for m in self.client.get_metric_history(run.info.run_id, mark)), default=-1)
                        for kind, mark in MARKS.items()}
                ended = run.data.tags.get(TRIAL_TAG) if run.info.status != "RUNNING" else None
                self.runs[key] = _Run(run.info.run_id, last,
                                      any(f"final/{m}" in run.data.metrics for m in curves.FINAL_METRICS),
                                      int(ended) if ended is not None else None)
            token = page.token
            if not token:
                break
        self._synced = True

    def _relay(self, trials: list[optuna.trial.FrozenTrial]) -> int:
        if not self._synced:
            self._sync()
        latest: dict[str, optuna.trial.FrozenTrial] = {}
        for t in trials:  # a point retried is one run: its latest trial speaks for it
            key = t.user_attrs.get(record.KEY)
            if key and record.RUN_DIR in t.user_attrs and (key not in latest or t.number > latest[key].number):
                latest[key] = t
        return sum(self._relay_trial(key, t) for key, t in sorted(latest.items()))

    def _relay_trial(self, key: str, t: optuna.trial.FrozenTrial) -> int:
        from mlflow.entities import Metric, Param, RunTag

        run = self.runs.get(key)
        if run is not None and run.ended_trial is not None:
            if t.number <= run.ended_trial:
                return 0
            self.client.update_run(run.run_id, status="RUNNING")  # the point was retried: its run goes on
            run.ended_trial = None
        metrics = self.study_dir / t.user_attrs[record.RUN_DIR] / "metrics.jsonl"
        seen = (metrics.stat().st_size, metrics.stat().st_mtime_ns) if metrics.exists() else None
        if run is not None and t.state == RUNNING and seen == run.seen:
            return 0  # a training run that wrote nothing since the last round: the file is not read again
        records = runio.read_jsonl(metrics)
        if run is None:
            if not records and t.state == RUNNING:
                return 0  # nothing to show yet
            level = ",".join(f"{f}={t.params[f]}" for f in self.factors if f in t.params)
            tags = {KEY_TAG: key, LEVEL_TAG: level, "harness.recipe": str(t.user_attrs.get("recipe", ""))}
            created = self.client.create_run(self._experiment(), run_name=key, tags=tags)
            run = self.runs[key] = _Run(created.info.run_id)
            self.client.log_batch(run.run_id, params=[Param(name, str(value)) for name, value in t.params.items()])
        now = int(time.time() * 1000)
        # Whole records per request (one request is one transaction on the server): a resync reads a
        # record's loss as the record sent, so no request may carry part of a record.
        sent, chunk = 0, list[curves.Point]()
        for r in records:
            points = list(curves.points([r]))
            if not points or points[0].x <= run.last[_kind(points[0])]:
                continue
            if len(chunk) + len(points) > BATCH:
                sent += self._send(run, chunk, now)
                chunk = []
            chunk += points
        sent += self._send(run, chunk, now)
        run.seen = seen  # only once sent: a failed request reads the file again next time
        if t.state == RUNNING:
            return sent
        final = curves.final(t.user_attrs)
        if final and not run.final:
            last = curves.last_epoch(records)
            self.client.log_batch(run.run_id, metrics=[Metric(f"final/{m}", v, now, last) for m, v in final.items()],
                                  tags=[RunTag("harness.outcome", str(t.user_attrs.get(record.OUTCOME, t.state.name)))])
            run.final, sent = True, sent + len(final)
        status = "FINISHED" if t.state == COMPLETE else "KILLED" if t.state == PRUNED else "FAILED"
        self.client.set_tag(run.run_id, TRIAL_TAG, str(t.number))
        self.client.set_terminated(run.run_id, status)
        run.ended_trial = t.number
        return sent

    def _send(self, run: _Run, points: list[curves.Point], now: int) -> int:
        from mlflow.entities import Metric

        if points:
            self.client.log_batch(run.run_id, metrics=[Metric(p.series, p.value, now, p.x) for p in points])
        for p in points:
            if p.series == MARKS[_kind(p)]:
                run.last[_kind(p)] = max(run.last[_kind(p)], p.x)
        return len(points)

    def _upload(self, report_dir: Path) -> bool:
        experiment = self._experiment()
        found = self.client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{REPORT_RUN}'",
                                        max_results=1)
        run_id = found[0].info.run_id if found else self.client.create_run(experiment, run_name=REPORT_RUN).info.run_id
        self.client.log_artifacts(run_id, str(report_dir), artifact_path="report")
        self.client.set_terminated(run_id, "FINISHED")
        return True


def _kind(point: curves.Point) -> str:
    return point.series.split("/", 1)[0]  # step | epoch


def catch_up(uri: str, name: str, storage_url: str, study_dir: Path, factors: list[str], report_dir: Path | None) -> bool:
    """What `python -m harness.report NAME --track URI` does: relay every trial's run, then the report.
    True when the server has all of it."""
    from harness.execution.storage import open_storage

    trials = optuna.load_study(study_name=name, storage=open_storage(storage_url, None)).get_trials(deepcopy=False)
    relay = MlflowRelay(uri, name, study_dir, factors)
    done = relay.relay(trials, now=True) is not None and (report_dir is None or relay.upload_report(report_dir))
    if not done:
        relay.missed(f"python -m harness.report {name} --track {redact(uri)}")
    return done
