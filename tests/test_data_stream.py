"""StreamingDataset on local files: exact content, rank shares, resumption, workers, cache,
bounded prefetch, corrupt shards, and the Ray Train context."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_transformer.data import (
    ChecksumMismatchError,
    CorruptShardError,
    EpochOrder,
    ManifestError,
    MissingShardError,
    StreamingDataset,
    check_shards,
    load_manifest,
    prepare,
)

SEQ = 64
N = 203  # samples; 10 per shard -> 21 shards, the last one with 3
G = 12


def make_indexed_text(path: Path, n: int = N, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    """Bytes whose i-th ``seq``-byte sample starts with i (4 bytes, big-endian)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(n, seq), dtype=np.uint8)
    rows[:, :4] = np.frombuffer(np.arange(n, dtype=">u4").tobytes(), np.uint8).reshape(n, 4)
    path.write_bytes(rows.tobytes())
    return rows


def ids_of(batch: torch.Tensor | np.ndarray) -> list[int]:
    a = np.asarray(batch, dtype=np.uint8).reshape(-1, SEQ)
    return [int.from_bytes(r[:4].tobytes(), "big") for r in a]


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    d = tmp_path_factory.mktemp("text")
    rows = make_indexed_text(d / "in.bin")
    url = f"file://{d}/ds"
    prepare(
        "text", url, path=str(d / "in.bin"), seq_len=SEQ, shard_bytes=SEQ * 10, fractions=(1, 0, 0)
    )
    return url, rows


def stream_ids(url: str, world: int, **kw) -> list[list[int]]:
    """Per rank, the ids it sees in a full pass (batched)."""
    out = []
    for r in range(world):
        ds = StreamingDataset(
            url, global_batch_size=G, rank=r, world_size=world, batched=True, **kw
        )
        out.append([ids_of(b) for b in ds])
    return out


def merge(per_rank: list[list[list[int]]]) -> list[int]:
    """The global order: batch by batch, rank by rank."""
    return [i for b in range(len(per_rank[0])) for rank in per_rank for i in rank[b]]


def test_samples_are_byte_identical(text_ds: tuple[str, np.ndarray]) -> None:
    url, rows = text_ds
    ds = StreamingDataset(url, global_batch_size=G, seed=7, rank=0, world_size=1)
    got = [x for x in ds]
    assert len(got) == (N // G) * G and all(x.dtype == torch.int64 for x in got)
    for x in got:
        i = ids_of(x)[0]
        np.testing.assert_array_equal(x.numpy().astype(np.uint8), rows[i])
    assert len(set(ids_of(torch.stack(got)))) == len(got)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_disjoint_and_whole_epoch_in_the_same_global_order(
    text_ds: tuple[str, np.ndarray], world: int
) -> None:
    url, _ = text_ds
    single = merge(stream_ids(url, 1, seed=1))
    per_rank = stream_ids(url, world, seed=1)
    flat = [i for rank in per_rank for b in rank for i in b]
    assert len(flat) == len(set(flat)) == (N // G) * G  # disjoint, the epoch less N mod G
    assert [len(r) for r in per_rank] == [N // G] * world  # equal shares
    assert merge(per_rank) == single  # the order does not depend on W


def test_dropped_remainder_differs_between_epochs(text_ds: tuple[str, np.ndarray]) -> None:
    url, _ = text_ds
    ds = StreamingDataset(url, global_batch_size=G, rank=0, world_size=1, batched=True)
    e0 = {i for b in ds for i in ids_of(b)}
    assert ds.epoch == 1 and ds.position == 0  # a finished pass moves to the next epoch
    e1 = {i for b in ds for i in ids_of(b)}
    assert len(e0) == len(e1) == N - N % G and e0 != e1


def test_wrap_policy_covers_every_sample(text_ds: tuple[str, np.ndarray]) -> None:
    url, _ = text_ds
    ids = merge(stream_ids(url, 2, remainder="wrap"))
    assert len(ids) == -(-N // G) * G and set(ids) == set(range(N))


@pytest.mark.parametrize(("w_before", "w_after"), [(2, 2), (2, 3), (4, 1), (1, 4)])
def test_resume_after_k_batches_equals_uninterrupted(
    text_ds: tuple[str, np.ndarray], w_before: int, w_after: int
) -> None:
    url, _ = text_ds
    full = merge(stream_ids(url, 1, seed=5, epoch=2))
    k = 6
    seen: list[list[list[int]]] = []
    states = []
    for r in range(w_before):
        ds = StreamingDataset(
            url, global_batch_size=G, seed=5, epoch=2, rank=r, world_size=w_before, batched=True
        )
        it = iter(ds)
        seen.append([ids_of(next(it)) for _ in range(k)])
        states.append(ds.state_dict())
    assert all(s == states[0] for s in states)  # every rank saves the same state
    assert states[0]["position"] == k * G and states[0]["epoch"] == 2
    rest = []
    for r in range(w_after):
        ds = StreamingDataset(
            url, global_batch_size=G, seed=5, rank=r, world_size=w_after, batched=True
        )
        ds.load_state_dict(json.loads(json.dumps(states[0])))  # survives a JSON checkpoint
        ds.set_epoch(2)  # a training loop's set_epoch keeps the restored position
        rest.append([ids_of(b) for b in ds])
    assert merge(seen) + merge(rest) == full


def test_resume_mid_local_batch_with_sample_iteration(text_ds: tuple[str, np.ndarray]) -> None:
    url, _ = text_ds
    kw = dict(global_batch_size=G, seed=9, rank=1, world_size=2)
    full = [ids_of(x)[0] for x in StreamingDataset(url, **kw)]
    ds = StreamingDataset(url, **kw)
    it = iter(ds)
    head = [ids_of(next(it))[0] for _ in range(17)]  # 2 local batches of 6, then 5 more
    state = ds.state_dict()
    assert (state["position"], state["rank_offset"]) == (2 * G, 5)
    ds2 = StreamingDataset(url, **kw)
    ds2.load_state_dict(state)
    assert head + [ids_of(x)[0] for x in ds2] == full
    other_world = StreamingDataset(url, global_batch_size=G, seed=9, rank=0, world_size=3)
    with pytest.raises(ValueError, match="middle of a local batch"):
        other_world.load_state_dict(state)


def test_state_from_another_order_is_refused(text_ds: tuple[str, np.ndarray]) -> None:
    url, _ = text_ds
    state = StreamingDataset(url, global_batch_size=G, seed=1, rank=0, world_size=1).state_dict()
    ds = StreamingDataset(url, global_batch_size=G, seed=2, rank=0, world_size=1)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        ds.load_state_dict(state)


def test_dataloader_workers_keep_the_global_order_and_the_state(
    text_ds: tuple[str, np.ndarray],
) -> None:
    url, _ = text_ds
    kw = dict(global_batch_size=G, seed=3, rank=1, world_size=2)
    reference = [ids_of(b) for b in StreamingDataset(url, batched=True, **kw)]
    for batched in (True, False):
        ds = StreamingDataset(url, batched=batched, **kw)
        loader = ds.loader(num_workers=2)
        assert len(loader) == N // G
        got = []
        for b in loader:
            assert tuple(b.shape) == (G // 2, SEQ) and b.dtype == torch.int64
            got.append(ids_of(b))
            if len(got) == 5:
                break
        state = loader.state_dict()
        assert state["position"] == 5 * G
        ds2 = StreamingDataset(url, batched=batched, **kw)
        ds2.load_state_dict(state)
        got += [ids_of(b) for b in ds2.loader(num_workers=2)]
        assert got == reference
        assert ds2.epoch == 1  # the loader moved to the next epoch at the end


def test_plain_dataloader_with_workers_yields_the_same_order(
    text_ds: tuple[str, np.ndarray],
) -> None:
    """A stock DataLoader also splits the work among its workers in the global order
    (without the position tracking that ``loader()`` adds)."""
    from torch.utils.data import DataLoader

    url, _ = text_ds
    kw = dict(global_batch_size=G, seed=6, rank=0, world_size=3)
    reference = [ids_of(b) for b in StreamingDataset(url, batched=True, **kw)]
    ds = StreamingDataset(url, **kw)
    got = [ids_of(b) for b in DataLoader(ds, batch_size=G // 3, num_workers=2)]
    assert got == reference


def test_output_types(text_ds: tuple[str, np.ndarray]) -> None:
    url, rows = text_ds
    ds = StreamingDataset(url, global_batch_size=4, rank=0, world_size=2, batched=True, dtype=None)
    b = next(iter(ds))
    assert isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.shape == (2, SEQ)
    np.testing.assert_array_equal(b, rows[ids_of(b)])
    ds = StreamingDataset(url, global_batch_size=4, rank=0, world_size=1, dtype=torch.uint8)
    x = next(iter(ds))
    assert x.dtype == torch.uint8 and x.shape == (SEQ,)
    assert len(ds) == (N // 4) * 4 - 1


def test_prefetch_is_bounded_and_each_shard_read_once(text_ds: tuple[str, np.ndarray]) -> None:
    url, _ = text_ds
    ds = StreamingDataset(
        url, global_batch_size=G, rank=0, world_size=1, shuffle_window=2, prefetch=1, batched=True
    )
    n = sum(1 for _ in ds)
    assert n == N // G
    stats = ds.stats.as_dict()
    # Every shard holding a sample of the epoch (less the dropped remainder) is read once.
    order = EpochOrder([10] * 20 + [3], seed=0, epoch=0, shuffle_window=2)
    needed = set(order.locate(np.arange(N // G * G))[0].tolist())
    assert stats["shards_fetched"] == len(needed) >= 19
    assert 2 <= stats["max_shards_held"] <= 2 + 1  # the window's shards + prefetch


def test_cache_serves_repeat_reads_and_evicts_lru(
    text_ds: tuple[str, np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = text_ds
    # 203 = 29 * 7: no remainder, every shard is read.
    kw = dict(global_batch_size=7, rank=0, world_size=1, batched=True, num_threads=1)
    cache = tmp_path / "cache"
    ds = StreamingDataset(url, cache_dir=cache, **kw)
    first = [ids_of(b) for b in ds]
    ds.set_epoch(0)
    ds2 = StreamingDataset(url, cache_dir=cache, **kw)
    assert [ids_of(b) for b in ds2] == first
    assert ds2.stats.shards_fetched == 0 and ds2.stats.cache_hits == 21

    # A corrupt cache entry is detected by its sha256 and fetched again.
    victim = sorted(cache.glob("*.parquet"))[0]
    victim.write_bytes(b"garbage")
    ds3 = StreamingDataset(url, cache_dir=cache, **kw)
    with caplog.at_level(logging.WARNING, logger="sparse_transformer.data"):
        assert [ids_of(b) for b in ds3] == first
    assert ds3.stats.shards_fetched == 1 and "corrupt" in caplog.text

    # With room for 3 shards, the 3 most recently used stay.
    small = tmp_path / "small"
    sizes = sorted(p.stat().st_size for p in cache.glob("*.parquet"))
    limit = sum(sizes[-3:])
    ds4 = StreamingDataset(url, cache_dir=small, cache_limit_bytes=limit, **kw)
    for _ in ds4:
        pass
    order = EpochOrder([10] * 20 + [3], seed=0, epoch=0, shuffle_window=4)
    used = [int(s) for w in order.windows for s in sorted(w.tolist())]  # fetch order
    expected = {ds4.manifest.splits["train"].shards[s].sha256 for s in used[-3:]}
    kept = {p.stem for p in small.glob("*.parquet")}
    assert sum(p.stat().st_size for p in small.glob("*.parquet")) <= limit
    assert kept == expected


def _copy_dataset(url: str, dest: Path) -> str:
    import shutil

    shutil.copytree(url.removeprefix("file://"), dest)
    return f"file://{dest}"


def test_corrupt_truncated_and_missing_shards_fail_naming_the_shard(
    text_ds: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url = _copy_dataset(text_ds[0], tmp_path / "ds")
    shard = tmp_path / "ds" / "train" / "00004.parquet"
    blob = bytearray(shard.read_bytes())
    kw = dict(global_batch_size=G, rank=0, world_size=1, shuffle=False, batched=True)

    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ChecksumMismatchError, match=r"train/00004\.parquet: sha256 .* manifest"):
        list(StreamingDataset(url, **kw))

    blob[len(blob) // 2] ^= 0xFF
    blob[-6] ^= 0xFF  # inside the footer length / magic
    shard.write_bytes(bytes(blob))
    with pytest.raises(CorruptShardError, match=r"train/00004\.parquet: not a readable Parquet"):
        list(StreamingDataset(url, verify=False, **kw))

    shard.write_bytes(bytes(blob[:-100]))
    with pytest.raises(ChecksumMismatchError, match=r"00004\.parquet: .* bytes, the manifest says"):
        list(StreamingDataset(url, **kw))
    # the driver's check before a run finds it too, from one listing of the folder
    with pytest.raises(ChecksumMismatchError, match=r"1 shard\(s\) differ.*train/00004\.parquet"):
        check_shards(load_manifest(url))

    shard.unlink()
    with pytest.raises(MissingShardError, match=r"1 shard\(s\) .* not in storage: train/00004"):
        check_shards(load_manifest(url))
    ds = StreamingDataset(url, **kw)
    it = iter(ds)
    got = [ids_of(next(it)) for _ in range(3)]  # shards 0-3 are fine: 40 samples
    assert got[0][0] == 0
    with pytest.raises(MissingShardError, match=r"shard .*train/00004\.parquet: not found"):
        list(it)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        StreamingDataset(f"file://{tmp_path}/nothing", global_batch_size=1)


def test_rank_and_world_from_the_environment(
    text_ds: tuple[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = text_ds
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = StreamingDataset(url, global_batch_size=G)
    assert (ds.rank, ds.world_size, ds.local_batch_size) == (2, 3, 4)
    with pytest.raises(ValueError, match="both rank and world_size"):
        StreamingDataset(url, global_batch_size=G, rank=0)


@pytest.mark.slow
def test_ray_train_workers_take_rank_and_world_from_the_process_group(
    text_ds: tuple[str, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Ray Train workers, each constructing the dataset without rank arguments: the
    ranks come from the process group TorchTrainer set up (data/ never imports Ray)."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Loopback only: by default Ray binds and connects through the machine's LAN address.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    url, _ = text_ds
    out = tmp_path / "ranks"
    out.mkdir()

    def loop(config: dict) -> None:
        import json as _json

        from sparse_transformer.data import StreamingDataset

        ds = StreamingDataset(config["url"], global_batch_size=G, seed=1, batched=True)
        batches = [b.numpy().astype("uint8")[:, :4].tolist() for b in ds.loader()]
        with open(f"{config['out']}/rank{ds.rank}.json", "w") as f:
            _json.dump({"world": ds.world_size, "batches": batches}, f)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        trainer = TorchTrainer(
            loop,
            train_loop_config={"url": url, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="data-test"),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    per_rank = []
    for r in range(2):
        d = json.loads((out / f"rank{r}.json").read_text())
        assert d["world"] == 2
        per_rank.append([[int.from_bytes(bytes(x), "big") for x in b] for b in d["batches"]])
    assert merge(per_rank) == merge(stream_ids(url, 1, seed=1))


@pytest.mark.parametrize("clock", ["real", "frozen"])
def test_shard_cache_orders_entries_used_within_one_clock_tick(
    tmp_path: Path, clock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries written and read microseconds apart (well inside a kernel tick, when the
    file system's own mtimes would tie) are evicted strictly least recently used first,
    even when the clock does not move at all between them (``frozen``)."""
    from sparse_transformer.data import cache as cache_mod

    if clock == "frozen":
        monkeypatch.setattr(cache_mod.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    cache = cache_mod.ShardCache(tmp_path, limit_bytes=3 * 100)
    # names in descending order: a tie on mtime (broken by name) would evict the newest
    keys = [f"k{i:02d}" for i in reversed(range(12))]
    for key in keys[:6]:
        cache.put(key, b"x" * 100)
    assert [p.stem for _, _, p in cache.entries()] == keys[3:6]
    assert cache.get(keys[3]) is not None  # now the most recently used
    for key in keys[6:8]:
        cache.put(key, b"x" * 100)
    assert [p.stem for _, _, p in cache.entries()] == [keys[3], keys[6], keys[7]]
