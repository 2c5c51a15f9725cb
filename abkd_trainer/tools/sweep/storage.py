"""Where a study lives, and how its workers find the trials of a worker that died.

`--storage` names one of three storages:

- none: Optuna's in-memory storage, one worker, the study dies with it;
- an SQLAlchemy URL (`sqlite:///sweep.db`, `postgresql+psycopg2://user:pass@host/db`,
  `mysql+pymysql://...`): Optuna's `RDBStorage`, for the workers of one machine (SQLite) or of
  several (a database server);
- `journal:///path/sweep.log`, `journal://relative.log` or any path ending in `.log`: Optuna's
  `JournalStorage` on a `JournalFileBackend`, for workers on several machines that share a file
  system (NFS) but no database server.

A worker killed in the middle of a trial (SIGKILL, a preempted machine) leaves the trial
`RUNNING`. While a trial runs its worker records a heartbeat every `heartbeat_interval` seconds;
a `RUNNING` trial without one for `grace_period` seconds is dead: it is marked `FAIL`, and Optuna's
`RetryHeartbeatStaleTrialCallback` queues a trial with the same parameters (and the dead trial's
intermediate values), up to `max_retries` times. On an `RDBStorage` this is Optuna's own heartbeat
(`RDBStorage(heartbeat_interval=..., grace_period=...)`, `optuna.storages.fail_stale_trials`,
the database server's clock); Optuna 5.0's `JournalStorage` has none, so for a journal
[SweepStorage][abkd_trainer.tools.sweep.storage.SweepStorage] records the heartbeat as the trial's
user attribute `heartbeat` (seconds since the epoch) from a thread, and compares it with the local
clock of the worker that looks (keep the machines' clocks within a few seconds).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.tools.sweep.search_space import import_optuna

if TYPE_CHECKING:
    import optuna

JOURNAL_SCHEME = "journal://"
# The trial's user attribute holding its last heartbeat on a journal (seconds since the epoch).
HEARTBEAT_ATTR = "heartbeat"
STORAGE_FORMS = (
    "an SQLAlchemy URL (sqlite:///sweep.db, postgresql+psycopg2://user:pass@host/db, "
    "mysql+pymysql://user:pass@host/db) or a journal file (journal:///shared/sweep.log, or a "
    "path ending in .log)"
)


def storage_kind(url: str | None) -> str:
    """Which storage `--storage` names: `"memory"`, `"rdb"` or `"journal"`.

    Args:
        url: the `--storage` value, or None.

    Raises:
        ValueError: `url` is neither an SQLAlchemy URL nor a journal file; the message lists the
            accepted forms.
    """
    if url is None:
        return "memory"
    if url.startswith(JOURNAL_SCHEME) or (url.endswith(".log") and "://" not in url):
        if not journal_path(url):
            raise ValueError(f"`storage` {url!r} names no journal file; use {STORAGE_FORMS}.")
        return "journal"
    if "://" not in url:
        raise ValueError(f"`storage` {url!r} is not a storage Optuna opens; use {STORAGE_FORMS}.")
    return "rdb"


def journal_path(url: str) -> str:
    """The file of a journal storage: `journal:///abs/x.log` gives `/abs/x.log`,
    `journal://x.log` the relative `x.log`, a plain `x.log` itself.

    Args:
        url: the `--storage` value.
    """
    return url[len(JOURNAL_SCHEME) :] if url.startswith(JOURNAL_SCHEME) else url


def retry_callback(max_retries: int | None) -> Any:
    """Optuna's `RetryHeartbeatStaleTrialCallback`, keeping the dead trial's intermediate values.

    Args:
        max_retries: how often the same parameters are re-run; None: without limit.
    """
    optuna = import_optuna()
    with warnings.catch_warnings():  # an experimental class since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=max_retries, inherit_intermediate_values=True
        )


def open_storage(
    url: str | None,
    attempts: int = 5,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retries: int | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage `url` names (see `storage_kind`).

    Workers that start together on a new database race to create its tables (one of them gets
    an `IntegrityError`), so opening is retried. SQLite waits up to a minute for a lock instead
    of failing with "database is locked" while another worker writes.

    Args:
        url: the `--storage` value, or None for memory.
        attempts: how often to try opening a database.
        heartbeat_interval: seconds between a running trial's heartbeats in a database; None: no
            heartbeats (a journal's heartbeats are `SweepStorage`'s).
        grace_period: seconds without a heartbeat after which a running trial is dead; None:
            twice `heartbeat_interval`.
        max_retries: how often a dead trial's parameters are re-run (database heartbeats only).
    """
    optuna = import_optuna()
    kind = storage_kind(url)
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(journal_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat_interval is not None:
        kwargs.update(
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry_callback(max_retries),
        )
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is an experimental argument
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass
class SweepStorage:
    """A study's storage with the means to find dead trials and queue them again.

    Attributes:
        url: the `--storage` value (None: memory).
        storage: the Optuna storage.
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without a heartbeat after which a running trial is dead.
        max_retries: how often the same parameters are re-run after their worker died.
    """

    url: str | None
    storage: Any
    heartbeat_interval: int = 60
    grace_period: int = 120
    max_retries: int | None = 3

    @classmethod
    def open(
        cls,
        url: str | None,
        *,
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        max_retries: int | None = 3,
    ) -> SweepStorage:
        """Open the storage `url` names, with heartbeats on a database or a journal.

        Args:
            url: the `--storage` value, or None for memory.
            heartbeat_interval: seconds between a running trial's heartbeats.
            grace_period: seconds without a heartbeat after which a running trial is dead;
                None: twice `heartbeat_interval`.
            max_retries: how often a dead trial's parameters are re-run; None: without limit.
        """
        grace_period = grace_period or 2 * heartbeat_interval
        storage = open_storage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            max_retries=max_retries,
        )
        return cls(url, storage, heartbeat_interval, grace_period, max_retries)

    @property
    def kind(self) -> str:
        """`"memory"`, `"rdb"` or `"journal"`."""
        return storage_kind(self.url)

    @contextlib.contextmanager
    def heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        """Record `trial`'s heartbeat while the block runs (on a journal; Optuna's
        `Study.optimize` does it on a database, and a study in memory needs none).

        Args:
            trial: the trial this worker runs.
        """
        if self.kind != "journal":
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                try:
                    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
                except Exception as error:  # a busy file system: try again at the next beat
                    warnings.warn(f"abkd-sweep: heartbeat not recorded ({error})", stacklevel=1)
                stop.wait(self.heartbeat_interval)

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale_trials(self, study: optuna.Study) -> list[int]:
        """Mark the running trials without a recent heartbeat `FAIL` and queue them again.

        Args:
            study: the shared study.

        Returns:
            The numbers of the trials this call failed (another worker may fail them first).
        """
        optuna = import_optuna()
        if self.kind == "memory":
            return []
        failed_before = {t.number for t in failed_trials(study)}
        if self.kind == "rdb":
            with warnings.catch_warnings():  # an experimental function since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            return sorted({t.number for t in failed_trials(study)} - failed_before)
        return self.fail_stale_journal_trials(study)

    def fail_stale_journal_trials(self, study: optuna.Study, now: float | None = None) -> list[int]:
        """`fail_stale_trials` on a journal: the last sign of life of a running trial is its
        `heartbeat` attribute or its start, whichever is later.

        A journal applies its operations in order, so of two workers failing the same trial only
        the first succeeds; the other gets an error and queues nothing.

        Args:
            study: the shared study.
            now: the time to compare with, in seconds since the epoch; None: this clock's.

        Returns:
            The numbers of the trials this call failed.
        """
        optuna = import_optuna()
        running = optuna.trial.TrialState.RUNNING
        now = time.time() if now is None else now
        stale = [
            trial
            for trial in study.get_trials(deepcopy=False, states=(running,))
            if now - last_sign_of_life(trial) > self.grace_period
        ]
        if not stale:
            return []
        # A handle whose sampler does nothing after a trial (a GridSampler would stop the study).
        handle = optuna.load_study(
            study_name=study.study_name,
            storage=self.storage,
            sampler=optuna.samplers.RandomSampler(),
        )
        failed = []
        for trial in stale:
            try:
                handle.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker failed it first
            self.queue_again(study, trial)
            failed.append(trial.number)
        return failed

    def queue_again(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Queue a trial with `trial`'s parameters (unless it was re-run `max_retries` times).

        Args:
            study: the shared study.
            trial: the trial whose worker died or was interrupted.
        """
        # The callback appends to the trial's retry history: give it a copy, not the cache's.
        retry_callback(self.max_retries)(study, copy.deepcopy(trial))


def failed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's `FAIL` trials.

    Args:
        study: the study.
    """
    optuna = import_optuna()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))


def last_sign_of_life(trial: optuna.trial.FrozenTrial) -> float:
    """The later of `trial`'s last journal heartbeat and its start, in seconds since the epoch.

    A re-run trial inherits its dead predecessor's heartbeat attribute, so its start counts too.

    Args:
        trial: a running trial.
    """
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
