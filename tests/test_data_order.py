"""The global order, the per-rank / per-worker plan, and the retry configuration (no storage:
the clients' retries against real servers are in test_data_s3 and test_data_download)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from sparse_transformer.data import (
    BatchPlan,
    ChecksumMismatchError,
    EpochOrder,
    RetriesExhaustedError,
    RetryPolicy,
)
from sparse_transformer.data.retry import giving_up
from sparse_transformer.data.storage import storage_options_for

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


def _client_error(code: str, status: int, **retry_metadata: object) -> Exception:
    from botocore.exceptions import ClientError

    meta = {"HTTPStatusCode": status, **retry_metadata}
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": meta}, "GetObject"
    )


def _through_giving_up(exc: Exception) -> Exception:
    try:
        with giving_up("shard s3://b/x"):
            raise exc
    except Exception as raised:  # noqa: BLE001 - what comes out is the point
        return raised
    raise AssertionError("giving_up swallowed the error")


def test_errors_the_client_gave_up_on_are_told_apart() -> None:
    """Failures the storage client retried until it gave up are named (RetriesExhaustedError);
    permanent ones, and responses the client did not retry, pass unchanged."""
    from botocore.exceptions import EndpointConnectionError, ResponseStreamingError
    from s3fs.errors import translate_boto_error

    spent = _client_error("InternalError", 500, MaxAttemptsReached=True, RetryAttempts=9)
    gave_up = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ResponseStreamingError(error="connection reset mid-body"),
        spent,
        translate_boto_error(spent),  # what s3fs raises: OSError(EREMOTEIO) from the above
        translate_boto_error(_client_error("SlowDown", 503, RetryQuotaReached=True)),
    ]
    passed = [
        FileNotFoundError("no such key"),
        translate_boto_error(_client_error("NoSuchKey", 404)),
        translate_boto_error(_client_error("AccessDenied", 403)),
        # an answer on the last attempt that is not worth retrying stays what it is
        translate_boto_error(_client_error("NoSuchKey", 404, MaxAttemptsReached=True)),
        _client_error("InvalidRange", 416),
        OSError(errno.EIO, "local disk"),
        ChecksumMismatchError("shard x: sha256 mismatch"),
        ValueError("bug"),
    ]
    for exc in gave_up:
        raised = _through_giving_up(exc)
        assert isinstance(raised, RetriesExhaustedError) and raised.__cause__ is exc
        assert str(raised).startswith("shard s3://b/x: giving up")
    assert [_through_giving_up(e) for e in passed] == passed


def test_one_policy_configures_both_clients() -> None:
    policy = RetryPolicy(max_attempts=4)
    opts = storage_options_for("s3://b/x", {"config_kwargs": {"read_timeout": 7}}, policy)
    assert opts["config_kwargs"] == {
        "connect_timeout": 5,
        "read_timeout": 7,  # the caller's own client settings win
        "retries": {"total_max_attempts": 4, "mode": "standard"},
    }
    mine = {"retries": {"max_attempts": 1, "mode": "adaptive"}}
    assert storage_options_for("s3://b/x", {"config_kwargs": mine}, policy)["config_kwargs"][
        "retries"
    ] == {"max_attempts": 1, "mode": "adaptive"}
    assert "config_kwargs" not in storage_options_for("file:///tmp/x", None, policy)

    retry = policy.http_retry("download x")
    assert retry.total == 3
    assert {408, 429, 500, 503, 504} <= set(retry.status_forcelist)
    assert not {400, 403, 404} & set(retry.status_forcelist)
    # Backoff: the first retry at once, then doubling, with up to 0.5 s of jitter, capped at 20 s.
    retry = RetryPolicy(max_attempts=20).http_retry("download x")
    waits = []
    for _ in range(8):
        retry = retry.increment("GET", "http://x/", error=ConnectionResetError("reset"))
        waits.append(retry.get_backoff_time())
    assert waits[0] == 0 and waits[-2:] == [20, 20]
    for wait, base in zip(waits[1:6], [1, 2, 4, 8, 16]):
        assert base <= wait <= base + 0.5
    with pytest.raises(ValueError, match="max_attempts must be >= 1"):
        RetryPolicy(max_attempts=0)
