"""Optuna storages by URL, opened (and checked) before anything is submitted.

  sqlite:///results/<study>/study.db   default; one machine (never on NFS)
  journal:///shared/fs/<study>.log     a journal file: several nodes on a shared filesystem
  postgresql://user:pw@host/db         a server: many nodes, with heartbeats that fail lost trials
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import optuna
import sqlalchemy.exc

from harness.run.errors import StudyError

# What a database that does not answer (restart, fail-over, network) raises through Optuna.
OUTAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                 sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError)

HEARTBEAT_S = 30  # a RUNNING trial whose worker is silent for 4 heartbeats is failed and retried


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and reports."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: int | None = HEARTBEAT_S, max_retry: int = 2):
    """The storage for `url`. On PostgreSQL/MySQL with `heartbeat_s` (workers), trials of workers that
    stopped beating are failed and re-enqueued (up to `max_retry` times) by the next worker that looks.
    The driver, which runs no trial itself, opens it without heartbeats."""
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal://"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            return _rdb(optuna.storages.RDBStorage, url, engine_kwargs={"connect_args": {"timeout": 60}})
        if re.match(r"^(postgresql|mysql)(\+\w+)?://", url):
            # pool_pre_ping: a connection that died with a server restart is replaced, not used.
            engine = {"pool_pre_ping": True}
            if not heartbeat_s:
                return _rdb(optuna.storages.RDBStorage, url, engine_kwargs=engine)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            return _rdb(PatientRDBStorage, url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                        grace_period=4 * heartbeat_s, heartbeat_stale_trial_callback=retry)
    except Exception as exc:  # driver missing, server down, bad path: all "cannot open"
        if "Failed to import DB access module" in str(exc):  # SQLAlchemy 2.1: postgresql:// means psycopg 3
            raise StudyError(f"--storage {redact(url)}: its database driver is not installed; "
                             f"pip install 'moco-harness[postgres]' (psycopg 3, SQLAlchemy's driver for "
                             f"postgresql://).") from None
        raise StudyError(f"--storage {redact(url)}: cannot open ({type(exc).__name__}: "
                         f"{redact(str(exc).splitlines()[0])[:300]}).") from None
    raise StudyError(f"--storage {redact(url)}: unsupported URL; use sqlite:///path.db, journal:///path.log "
                     f"or postgresql://user:password@host/db.")


def _rdb(cls, url: str, attempts: int = 5, **kwargs):
    """An RDBStorage. Its first use on an empty database creates the schema, which is not safe when
    two processes do it at once (PostgreSQL: a unique violation on pg_type as both create a table;
    SQLite: "table studies already exists"; two studies launched together on a new database, or a
    `--status` while a driver starts): the loser's next try finds the tables."""
    for attempt in range(attempts):
        try:
            return cls(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
            collided = not isinstance(exc, sqlalchemy.exc.OperationalError) or "already exists" in str(exc)
            if not collided or attempt == attempts - 1:  # an OperationalError is otherwise a database down
                raise
            time.sleep(0.5 * (attempt + 1))


class PatientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage with heartbeats that outlive a database outage.

    Optuna's heartbeat thread stops at the first beat that fails, and a worker that stopped beating
    is declared dead: an outage would fail and rerun every trial in progress. Here a beat that cannot
    be written is skipped (the next is tried at the usual interval), and the time of the last failure
    is kept, so that no one judges heartbeats until a whole grace period has passed with the database
    up (`judges_heartbeats`): an alive worker has beaten again by then."""

    last_outage: float = float("-inf")

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except OUTAGE_ERRORS:
            self.saw_outage()

    def saw_outage(self) -> None:
        self.last_outage = time.monotonic()

    def judges_heartbeats(self) -> bool:
        return time.monotonic() - self.last_outage > (self.grace_period or 0)


class Outage:
    """Waits out a database that does not answer: retries with backoff, says once what it waits for,
    says when it is back, and gives up past `limit_s` with one line that names the cause and the fix."""

    def __init__(self, url: str, limit_s: float, reattach: str, who: str = "driver", storage=None):
        """`storage`: a PatientRDBStorage told of each failure (no heartbeat is judged too soon after)."""
        self.url, self.limit_s, self.reattach, self.who = redact(url), limit_s, reattach, who
        self.storage = storage
        self.since: float | None = None
        self.delay = 1.0

    def patiently(self, call):
        """`call()`, again after each failure the database's outage causes, until it answers."""
        while True:
            try:
                result = call()
            except OUTAGE_ERRORS as exc:
                if isinstance(self.storage, PatientRDBStorage):
                    self.storage.saw_outage()
                self.wait(exc)
                continue
            self.clear()
            return result

    def wait(self, exc: BaseException) -> None:
        now = time.monotonic()
        cause = redact(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")[:200]
        if self.since is None:
            self.since = now
            print(f"[{self.who}] the study's database {self.url} does not answer ({cause}); retrying for up to "
                  f"{self.limit_s / 60:.1f} min. Jobs keep training meanwhile.", file=sys.stderr, flush=True)
        if now - self.since > self.limit_s:
            raise StudyError(f"the study's database {self.url} has not answered for {(now - self.since) / 60:.1f} min "
                             f"({cause}). Nothing is lost: jobs keep training and their run directories keep the "
                             f"results. Once the database is back, re-attach with: {self.reattach}")
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 30.0)

    def clear(self) -> None:
        if self.since is not None:
            print(f"[{self.who}] the study's database answers again after {time.monotonic() - self.since:.0f} s.",
                  file=sys.stderr, flush=True)
        self.since, self.delay = None, 1.0
