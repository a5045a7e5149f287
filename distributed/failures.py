"""Which worker failures Ray Train may retry, and the callback that stops the rest.

Ray Train restarts the worker group after any worker error, up to
``run.max_failures`` times. That is right for a dead process, a lost node or a
transient storage outage, and a waste for an error that will happen again: a shard
deleted from storage, a damaged manifest, a checkpoint that fails verification, a
config the workers reject. Those are *permanent*: :class:`StopOnPermanentError`
(a Ray Train ``UserCallback``, run on the controller) sees the worker errors of each
failed attempt and, when one is permanent, raises :class:`PermanentWorkerError`, which
Ray Train's failure policy does not retry (a controller error). The driver turns it
into a ``TrainingError`` that says the run was not retried and why.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.train import UserCallback

from sparse_transformer.data.errors import DataError, DownloadError, RetriesExhaustedError

# A transient failure that outlived the loader's own retries may pass on a restart.
_TRANSIENT_DATA_ERRORS = (RetriesExhaustedError, DownloadError)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it wraps, outermost first: Ray Train's
    ``UserExceptionWithTraceback`` (``_base_exc``), Ray's ``RayTaskError`` and our
    :class:`WorkerRankError` (both ``cause``)."""
    chain = [err]
    for _ in range(8):
        inner = getattr(chain[-1], "_base_exc", None) or getattr(chain[-1], "cause", None)
        if not isinstance(inner, BaseException) or inner in chain:
            break
        chain.append(inner)
    return chain


def root_cause(err: BaseException) -> BaseException:
    """The worker's own exception inside the wrappers around it."""
    return _chain(err)[-1]


def worker_report(err: BaseException) -> str:
    """The fullest text of a worker's failure: our rank, error and worker traceback when
    the worker's loop wrapped it, else the error's own text."""
    wrapped = [e for e in _chain(err) if isinstance(e, WorkerRankError)]
    return str(wrapped[0] if wrapped else root_cause(err))


class WorkerRankError(RuntimeError):
    """A worker's error as the driver shows it: the rank, the error's type and text, and
    the worker's traceback; ``cause`` keeps the error itself (``__cause__`` does not
    survive pickling), so the controller can tell a permanent error."""

    def __init__(self, rank: int, cause: BaseException, traceback_text: str) -> None:
        super().__init__(
            f"training worker rank {rank} failed: {type(cause).__name__}: {cause}\n"
            f"--- worker traceback (rank {rank}) ---\n{traceback_text}"
        )
        self.rank, self.cause, self.traceback_text = rank, cause, traceback_text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rank, self.cause, self.traceback_text))

    @classmethod
    def of(cls, rank: int, cause: BaseException, traceback_text: str) -> WorkerRankError:
        """The failure, keeping ``cause`` only if it pickles (else a RuntimeError with its
        type and text stands in: Ray must be able to send the failure to the driver)."""
        try:
            pickle.loads(pickle.dumps(cause))
        except Exception:  # noqa: BLE001 - any pickling problem
            cause = RuntimeError(f"{type(cause).__name__}: {cause}")
        return cls(rank, cause, traceback_text)


def is_permanent(err: BaseException) -> bool:
    """Whether a worker error will recur on a restart: bad data, a checkpoint that fails
    verification, or a config the workers reject."""
    from sparse_transformer.distributed.checkpoint import CheckpointError
    from sparse_transformer.distributed.config import ConfigError

    cause = root_cause(err)
    if isinstance(cause, _TRANSIENT_DATA_ERRORS):
        return False
    return isinstance(cause, (DataError, CheckpointError, ConfigError))


class PermanentWorkerError(RuntimeError):
    """Raised on the Ray Train controller to end a run whose workers failed for good;
    ``worker_failures`` maps each failed rank to its error."""

    def __init__(self, worker_failures: dict[int, BaseException]) -> None:
        self.worker_failures = dict(worker_failures)
        ranks = sorted(r for r, e in self.worker_failures.items() if is_permanent(e))
        first = root_cause(self.worker_failures[ranks[0]]) if ranks else None
        super().__init__(
            f"not retried: a permanent error on rank(s) {', '.join(map(str, ranks))}: "
            f"{type(first).__name__}: {first}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_failures,))


class StopOnPermanentError(UserCallback):
    """Ends the run, without the restarts ``run.max_failures`` allows, on a permanent
    worker error (see :func:`is_permanent`); other errors take Ray Train's usual path."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        if any(is_permanent(e) for e in worker_exceptions.values()):
            raise PermanentWorkerError(worker_exceptions)


def permanent_failure(err: BaseException) -> PermanentWorkerError | None:
    """The :class:`PermanentWorkerError` that ended a ``trainer.fit()``, if that is what did
    (Ray Train raises it wrapped in a ``ControllerError``)."""
    failure = getattr(err, "controller_failure", None)
    return failure if isinstance(failure, PermanentWorkerError) else None
