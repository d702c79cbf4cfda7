"""Hydra callbacks of the training and evaluation commands (registered in ``configs/hydra/default.yaml``).

* :class:`CheckFolders`: before Hydra creates the run folder, every folder the run will write to must be
  writable; otherwise one ``error:`` line names it (exit status 2) instead of an ``OSError`` traceback.
* :class:`SweepFolders`: in a multirun that varies more than the hand type, every job trains into a folder of
  its own, named from its overrides of the swept keys (``outputs/train/model.lr=0.0001/dorsal_right``).
* :class:`SweepSummary`: in a multirun (``-m hand=a,b``) a job that fails does not stop the others; each
  failure is reported when it happens, and the sweep ends with a summary and exit status 2 (1 when a
  failure was not an input error). With launchers that run jobs in other processes (joblib, submitit),
  Hydra's own report of the first failed job stands.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from handclip.config import SWEPT_KEYS_VARIABLE
from handclip.errors import HandCLIPError, error_message, user_error
from handclip.run_folder import check_folders_writable


class CheckFolders(Callback):
    """Refuse a run whose output, checkpoint, log or cache folder cannot be written, before anything starts."""

    def _check(self, config: DictConfig) -> None:
        try:
            check_folders_writable(config)
        except HandCLIPError as err:
            print(f"error: {error_message(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun varies: sweeps on its command line (``model.lr=1e-4,3e-4``, ``seed=range(3)``) and the
    search space of a sweeper (``hydra.sweeper.params`` of ``hparams_search=optuna``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {o.get_key_element().lstrip("+~") for o in overrides if o.is_sweep_override()}
    params = config.hydra.get("sweeper", {}).get("params") or {}
    return keys | {str(k) for k in params}


class SweepFolders(Callback):
    """Tell the jobs of a multirun which keys it varies (``${handclip_sweep_dir:}`` names their folders from them).

    Through the environment, so that jobs run by other processes (submitit) and the processes a DDP job starts
    agree on the folder."""

    def __init__(self) -> None:
        self._before: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._before = os.environ.get(SWEPT_KEYS_VARIABLE)
        os.environ[SWEPT_KEYS_VARIABLE] = ",".join(sorted(swept_keys(config))) or ","

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._before is None:
            os.environ.pop(SWEPT_KEYS_VARIABLE, None)
        else:
            os.environ[SWEPT_KEYS_VARIABLE] = self._before


def _failure(job_return: JobReturn) -> BaseException:
    """The exception of a failed job, from Hydra's public ``JobReturn.return_value`` (which raises it, after a line
    on stderr that the report here replaces)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            value = job_return.return_value
        except BaseException as err:
            return err
    return RuntimeError(f"the job failed without an exception (it returned {value!r})")


class SweepSummary(Callback):
    """Let a multirun go on past a failed job; end it with a summary and a non-zero exit status."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._swept: set[str] = set()
        self._jobs: list[tuple[list[str], str | None, bool]] = []  # (what differs, error, input error?)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._swept = swept_keys(config)
        self._pid, self._jobs = os.getpid(), []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self._pid != os.getpid():  # a single run, or a job launched in another process
            return
        overrides = [o for o in job_return.overrides or [] if o.partition("=")[0].lstrip("+~") in self._swept]
        if job_return.status != JobStatus.FAILED:
            self._jobs.append((overrides, None, True))
            return
        err = _failure(job_return)
        found = user_error(err)
        if found is not None:
            message = error_message(found)
            print(f"error: [{' '.join(overrides)}] {message}", file=sys.stderr)
        else:
            message = f"{type(err).__name__}: {err}"
            traceback.print_exception(err, file=sys.stderr)
        self._jobs.append((overrides, message, found is not None))
        # Reported here and in the summary: the sweep goes on with the next job.
        job_return.status, job_return.return_value = JobStatus.COMPLETED, None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._pid != os.getpid() or not self._jobs:
            return
        failed = [(o, m, user) for o, m, user in self._jobs if m is not None]
        lines = [f"sweep summary: {len(self._jobs) - len(failed)} of {len(self._jobs)} job(s) finished"]
        for number, (overrides, message, _) in enumerate(self._jobs):
            name = " ".join(overrides) or f"job {number}"
            lines.append(f"  {name}: {'ok' if message is None else 'FAILED: ' + message}")
        print("\n".join(lines), file=sys.stderr)
        if failed:
            training = config.get("task_name") == "train"
            again = " with ckpt_path=auto (resumes, starts or skips each run)" if training else ""
            print(f"error: {len(failed)} of {len(self._jobs)} job(s) failed; fix the cause and run the same command "
                  f"again{again}", file=sys.stderr)
            raise SystemExit(2 if all(user for _, _, user in failed) else 1)
