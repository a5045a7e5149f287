"""Retries of storage requests: configured here, once, and carried out by the storage clients.

:class:`RetryPolicy` (``max_attempts`` per request, the first included) becomes each
client's own setting:

- S3 (s3fs over botocore): botocore's ``standard`` retry mode, ``total_max_attempts``
  in the client config (:mod:`storage` puts it in ``config_kwargs["retries"]``; a
  ``retries`` of the caller's own ``config_kwargs`` wins). The readers and ``prepare``
  use ``RetryPolicy()``; storage opened without a policy gets :data:`FAIL_FAST`.
  Botocore retries connection errors, timeouts, HTTP 5xx and throttling with jittered
  exponential backoff (at most 20 s a wait) and fails at once on 403, 404 and other
  client errors. s3fs also re-issues a GET whose body is cut mid-read and a throttled
  (``SlowDown``) request (its own ``retries``, 5): botocore has handed a streamed body
  over by then.
- HTTP downloads (:mod:`download`): urllib3's ``Retry`` from :meth:`RetryPolicy.http_retry`.
- Local files are not retried; other fsspec filesystems (``gs://``) retry as their
  clients do.

Two small pieces stay here because the clients lack them: :func:`log_s3_retries` logs
each retry botocore makes (it retries silently), and :func:`giving_up` names the object
in the error a client raises once its retries are spent (:class:`RetriesExhaustedError`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from urllib3.util.retry import Retry

from sparse_transformer.data.errors import DataError, RetriesExhaustedError

log = logging.getLogger("sparse_transformer.data")

# HTTP statuses worth another attempt: timeout, too many requests, server errors.
HTTP_RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a storage request is tried (the first attempt included) before the
    client gives up. The waits between attempts are the clients' own: jittered and
    growing, at most 20 s each."""

    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def s3_config(self) -> dict[str, Any]:
        """Botocore's retry setting (s3fs's ``config_kwargs["retries"]``)."""
        return {"total_max_attempts": self.max_attempts, "mode": "standard"}

    def http_retry(self, what: str) -> Retry:
        """urllib3's ``Retry`` for one download: connection errors, timeouts and HTTP 408,
        429 and 5xx are retried (the first retry at once, then after 1, 2, 4, ... s plus
        up to 0.5 s of jitter, at most 20 s); each retry is logged naming ``what``."""
        return _LoggedRetry(
            total=self.max_attempts - 1,
            status_forcelist=HTTP_RETRY_STATUSES,
            backoff_factor=0.5,
            backoff_jitter=0.5,
            backoff_max=20.0,
            what=what,
        )


# The budget of storage opened without a policy, where failing fast matters more: a probe,
# a listing, Ray's run folder. The readers and ``prepare`` use ``RetryPolicy()``.
FAIL_FAST = RetryPolicy(max_attempts=3)


class _LoggedRetry(Retry):
    """urllib3's ``Retry``, logging each retry it allows (urllib3 logs them at debug level)."""

    def __init__(self, *args: Any, what: str = "request", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.what = what

    def new(self, **kw: Any) -> _LoggedRetry:
        return super().new(what=self.what, **kw)

    def increment(self, *args: Any, **kwargs: Any) -> _LoggedRetry:
        retry = super().increment(*args, **kwargs)  # raises MaxRetryError when spent
        failure = retry.history[-1]
        if failure.error is not None:
            why = f"{type(failure.error).__name__}: {failure.error}"
        else:
            why = f"HTTP Error {failure.status}"
        attempts = len(retry.history)
        most = attempts + 1 + retry.total if isinstance(retry.total, int) else "?"
        log.warning(
            "%s: transient failure (attempt %d/%s): %s; retrying in %.2f s",
            self.what,
            attempts,
            most,
            why,
            retry.get_backoff_time(),
        )
        return retry


# Where the needs-retry handler leaves the failure for the request-created handler.
_FAILURE_KEY = "sparse_transformer_failure"


def log_s3_retries(fs: Any) -> None:
    """Log each retry of the S3 client of s3fs filesystem ``fs`` on the
    ``sparse_transformer.data`` logger, naming the object (installing it again is a no-op).

    Botocore retries silently; its events say what failed (``needs-retry``, after every
    attempt) and when a request is sent again (``request-created`` with attempt > 1), so
    exactly the retries botocore decides on are logged, with the failure before each.
    """
    client = fs.connect()
    most = client.meta.config.retries.get("total_max_attempts", "?")

    def note_failure(
        request_dict: dict[str, Any],
        response: Any = None,
        caught_exception: BaseException | None = None,
        **_: Any,
    ) -> None:
        if caught_exception is not None:
            why = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None:
            http, parsed = response
            code = parsed.get("Error", {}).get("Code")
            why = f"HTTP Error {http.status_code}" + (f" {code}" if code else "")
        else:
            return
        request_dict["context"][_FAILURE_KEY] = why

    def log_retry(request: Any, operation_name: str, **_: Any) -> None:
        context = request.context
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt < 2:
            return
        params = context.get("input_params", {})
        name = f"s3://{params['Bucket']}/{params.get('Key', '')}" if "Bucket" in params else ""
        log.warning(
            "%s %s: transient failure (attempt %d/%s): %s; retrying",
            operation_name,
            name or request.url,
            attempt - 1,
            most,
            context.get(_FAILURE_KEY, "unknown"),
        )

    events = client.meta.events
    events.register("needs-retry.s3", note_failure, unique_id="sparse-transformer-note-failure")
    events.register("request-created.s3", log_retry, unique_id="sparse-transformer-log-retry")


def _client_gave_up(exc: BaseException) -> bool:
    """Whether ``exc`` is what botocore raises once its retries are spent: a connection or
    HTTP-level error (the kinds its standard mode retries), or an error response it marked
    as the last of its attempts or retry quota."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotocoreConnectionError

    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, ClientError):
            meta = current.response.get("ResponseMetadata", {})
            return bool(meta.get("MaxAttemptsReached") or meta.get("RetryQuotaReached"))
        if isinstance(current, (BotocoreConnectionError, HTTPClientError)):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def giving_up(what: str) -> Iterator[None]:
    """Re-raise a failure the storage client retried until it gave up as
    :class:`RetriesExhaustedError` naming ``what``; anything else passes unchanged
    (``FileNotFoundError`` and ``PermissionError`` at once: the clients never retry them)."""
    try:
        yield
    except (FileNotFoundError, PermissionError, DataError):
        raise
    except Exception as exc:
        if not _client_gave_up(exc):
            raise
        raise RetriesExhaustedError(
            f"{what}: giving up, the storage client's retries are spent; "
            f"last error: {type(exc).__name__}: {exc}"
        ) from exc
