"""The global order, the per-rank / per-worker plan, and the retry machinery (no storage)."""

from __future__ import annotations

import errno
import socket
import time
import urllib.error

import numpy as np
import pytest

from sparse_transformer.data import (
    BatchPlan,
    ChecksumMismatchError,
    EpochOrder,
    RetriesExhaustedError,
    RetryPolicy,
)
from sparse_transformer.data.retry import is_transient, retry_call

SIZES = [7, 7, 7, 7, 7, 3]  # the last shard is short, as a split's last shard is


def global_ids(order: EpochOrder, positions: np.ndarray) -> np.ndarray:
    shards, rows = order.locate(positions)
    starts = np.concatenate([[0], np.cumsum(SIZES)])
    return starts[shards] + rows


def test_epoch_order_is_a_seeded_permutation() -> None:
    n = sum(SIZES)
    o = EpochOrder(SIZES, seed=3, epoch=0, shuffle_window=2)
    ids = global_ids(o, np.arange(n))
    assert sorted(ids) == list(range(n))
    again = global_ids(EpochOrder(SIZES, seed=3, epoch=0, shuffle_window=2), np.arange(n))
    np.testing.assert_array_equal(ids, again)
    other_epoch = global_ids(EpochOrder(SIZES, seed=3, epoch=1, shuffle_window=2), np.arange(n))
    other_seed = global_ids(EpochOrder(SIZES, seed=4, epoch=0, shuffle_window=2), np.arange(n))
    assert not np.array_equal(ids, other_epoch) and not np.array_equal(ids, other_seed)
    plain = EpochOrder(SIZES, seed=3, epoch=0, shuffle=False, shuffle_window=2)
    np.testing.assert_array_equal(global_ids(plain, np.arange(n)), np.arange(n))


def test_shuffle_stays_within_windows_of_shards() -> None:
    o = EpochOrder(SIZES, seed=0, epoch=5, shuffle_window=2)
    shards, _ = o.locate(np.arange(sum(SIZES)))
    for w, members in enumerate(o.windows):
        a, b = o.window_starts[w], o.window_starts[w + 1]
        assert set(shards[a:b].tolist()) == set(members.tolist())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_disjoint_equal_and_cover_the_epoch(world: int) -> None:
    total, g = sum(SIZES), 12  # 38 samples: 3 full global batches, 2 dropped
    shares = []
    for r in range(world):
        plan = BatchPlan(total, g, r, world)
        assert plan.num_batches == 3
        shares.append(np.concatenate([plan.batch_positions(b) for b in range(3)]))
    assert len({len(s) for s in shares}) == 1  # equal shares
    allpos = np.concatenate(shares)
    assert len(set(allpos.tolist())) == len(allpos) == 36  # disjoint
    assert set(allpos.tolist()) == set(range(36))  # the whole epoch less the remainder
    # Rank r holds the r-th slice of every global batch, so the global order is W-free.
    merged = [
        p
        for b in range(3)
        for s in range(world)
        for p in shares[s][b * (12 // world) :][: 12 // world]
    ]
    assert merged == list(range(36))


def test_wrap_remainder_sees_every_sample() -> None:
    plan = BatchPlan(38, 12, 0, 1, remainder="wrap")
    assert plan.num_batches == 4
    pos = np.concatenate([plan.batch_positions(b) for b in range(4)])
    assert set(pos.tolist()) == set(range(38))
    assert pos[-10:].tolist() == list(range(10))  # the last batch wraps to the start


def test_resume_from_a_position_continues_the_same_sequence() -> None:
    full = BatchPlan(38, 6, 0, 1)
    rest = BatchPlan(38, 6, 0, 1, start=18)
    assert rest.num_batches == 3
    np.testing.assert_array_equal(rest.batch_positions(0), full.batch_positions(3))


def test_workers_round_robin_restores_the_order() -> None:
    plan = BatchPlan(100, 8, 1, 2)  # rank 1 of 2: 4 samples per batch, 12 batches
    per_worker = [list(plan.worker_batches(k, 3)) for k in range(3)]
    assert [len(w) for w in per_worker] == [4, 4, 4]
    interleaved = [b for i in range(4) for w in per_worker for b, _ in w[i : i + 1]]
    assert interleaved == list(range(12))
    (b0, pos), *_ = plan.worker_batches(0, 1, skip=3)
    assert b0 == 0 and pos.tolist() == [7]


def test_invalid_geometry_is_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        BatchPlan(100, 8, 0, 3)
    with pytest.raises(ValueError, match="rank 2 not in"):
        BatchPlan(100, 8, 2, 2)
    with pytest.raises(ValueError, match="remainder must be one of"):
        BatchPlan(100, 8, 0, 1, remainder="pad")


# ------------------------------------------------------------------ retries


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_transient_and_permanent_errors_are_told_apart() -> None:
    from botocore.exceptions import EndpointConnectionError
    from s3fs.errors import translate_boto_error

    transient = [
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError("timed out"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        translate_boto_error(_client_error("SlowDown", 503)),
        translate_boto_error(_client_error("ServiceUnavailable", 503)),
        urllib.error.HTTPError("http://x", 503, "Service Unavailable", {}, None),
        urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
    ]
    permanent = [
        FileNotFoundError("no such key"),
        translate_boto_error(_client_error("NoSuchKey", 404)),
        translate_boto_error(_client_error("AccessDenied", 403)),
        _client_error("NoSuchBucket", 404),
        urllib.error.HTTPError("http://x", 404, "Not Found", {}, None),
        ChecksumMismatchError("shard x: sha256 mismatch"),
        ValueError("bug"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    p = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [p.delay(retry) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap
        assert max(delays) - min(delays) > cap / 10  # jittered, not lockstep


def test_refused_connection_is_retried_then_given_up_within_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real failure: nothing listens on the port, every connect is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass

    policy = RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.1, deadline_s=10)
    t0 = time.monotonic()
    with pytest.raises(RetriesExhaustedError, match=r"shard s3://b/x: giving up after 4 attempts"):
        retry_call(connect, what="shard s3://b/x", policy=policy)
    assert time.monotonic() - t0 < 5  # backoff sleeps total ~0.25 s; margin for a busy CI
    retries = [r for r in caplog.records if "transient failure" in r.getMessage()]
    assert len(retries) == 3 and "ConnectionRefusedError" in retries[0].getMessage()

    # The deadline bounds the total time even with attempts to spare.
    policy = RetryPolicy(max_attempts=100, base_delay_s=0.2, max_delay_s=0.2, deadline_s=0.5)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        time.sleep(s)

    t0 = time.monotonic()
    with pytest.raises(RetriesExhaustedError, match="deadline"):
        retry_call(connect, what="shard s3://b/x", policy=policy, sleep=sleep)
    assert sum(slept) <= 0.5 + 1e-9 and len(slept) < 5  # never sleeps past the deadline
    assert time.monotonic() - t0 < 0.5 + 2  # plus the refused connects, on a busy CI


def test_permanent_error_is_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        open("/nonexistent/shard.parquet", "rb")  # noqa: SIM115

    with pytest.raises(FileNotFoundError):
        retry_call(missing, what="shard", policy=RetryPolicy(base_delay_s=0.01))
    assert len(calls) == 1
