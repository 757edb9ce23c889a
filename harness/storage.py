"""Optuna storages by URL, opened (and checked) before anything is submitted.

  sqlite:///results/<study>/study.db   default; one machine (never on NFS)
  journal:///shared/fs/<study>.log     a journal file: several nodes on a shared filesystem
  postgresql://user:pw@host/db         a server: many nodes, with heartbeats that fail lost trials
"""
from __future__ import annotations

import re
from pathlib import Path

import optuna

from .studyfile import StudyError

HEARTBEAT_S = 30  # a RUNNING trial whose worker is silent for 4 heartbeats is failed and retried


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and reports."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, max_retry: int = 2):
    """The storage for `url`. On PostgreSQL/MySQL, trials of workers that stopped beating are failed
    and re-enqueued (up to `max_retry` times) by the next worker that looks."""
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal://"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        if re.match(r"^(postgresql|mysql)(\+\w+)?://", url):
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s,
                                              heartbeat_stale_trial_callback=retry)
    except Exception as exc:  # driver missing, server down, bad path: all "cannot open"
        raise StudyError(f"--storage {redact(url)}: cannot open ({type(exc).__name__}: "
                         f"{redact(str(exc).splitlines()[0])[:300]}).") from None
    raise StudyError(f"--storage {redact(url)}: unsupported URL; use sqlite:///path.db, journal:///path.log "
                     f"or postgresql://user:password@host/db.")
