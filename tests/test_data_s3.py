"""Against a real S3 server (SeaweedFS on loopback): prepare to S3 and stream back, rank
shares, resumption across world sizes, a server crash mid-epoch, corrupt and missing shards;
and the S3 client's own retries against a scripted S3 endpoint (server errors retried and
logged, 403/404 not retried)."""

from __future__ import annotations

import argparse
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from sparse_transformer.data import (
    ChecksumMismatchError,
    MalformedSourceError,
    ManifestError,
    MissingShardError,
    RetriesExhaustedError,
    RetryPolicy,
    StreamingDataset,
    check_shards,
    load_manifest,
    prepare,
)
from sparse_transformer.data.manifest import Manifest, SplitInfo
from tests.s3server import SeaweedS3, free_ports
from tests.test_data_formats import cifar_to_hwc, make_cifar_tarball, make_npz
from tests.test_data_stream import SEQ, G, N, ids_of, make_indexed_text, merge


@pytest.fixture(scope="module")
def s3_text(
    seaweed: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict, np.ndarray]:
    """The indexed text dataset of test_data_stream, in a bucket: 21 shards of 10 samples."""
    d = tmp_path_factory.mktemp("s3text")
    rows = make_indexed_text(d / "in.bin")
    url = seaweed.make_bucket("stream-text") + "/ds"
    prepare(
        "text",
        url,
        path=str(d / "in.bin"),
        seq_len=SEQ,
        shard_bytes=SEQ * 10,
        fractions=(1, 0, 0),
        storage_options=seaweed.storage_options,
    )
    return url, seaweed.storage_options, rows


def s3_ids(url: str, opts: dict, world: int, **kw) -> list[list[list[int]]]:
    out = []
    for r in range(world):
        ds = StreamingDataset(
            url,
            global_batch_size=G,
            rank=r,
            world_size=world,
            batched=True,
            storage_options=opts,
            **kw,
        )
        out.append([ids_of(b) for b in ds])
    return out


def test_prepare_cifar_to_s3_and_stream_back_identical(
    s3: tuple[str, dict], tmp_path: Path
) -> None:
    bucket, opts = s3
    tarball = tmp_path / "cifar-10-python.tar.gz"
    batches = make_cifar_tarball(tarball, per_batch=24)
    url = f"{bucket}/cifar10"
    m = prepare("cifar10", url, path=str(tarball), validation_size=8, storage_options=opts)
    local = prepare("cifar10", f"file://{tmp_path}/local", path=str(tarball), validation_size=8)
    # The same shards, byte for byte, whatever the storage.
    for split in m.splits:
        assert [s.sha256 for s in m.splits[split].shards] == [
            s.sha256 for s in local.splits[split].shards
        ]
    assert load_manifest(url, opts).to_json() == m.to_json()
    train = cifar_to_hwc(np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]))
    expected = {
        "train": train[:112],
        "validation": train[112:],
        "test": cifar_to_hwc(batches["test_batch"]),
    }
    for split, rows in expected.items():
        ds = StreamingDataset(
            url,
            split=split,
            global_batch_size=4,
            rank=0,
            world_size=1,
            shuffle=False,
            dtype=None,
            storage_options=opts,
        )
        got = np.stack(list(ds))
        np.testing.assert_array_equal(got, rows[: len(got)])
        assert len(got) == len(rows) // 4 * 4


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_over_s3_are_disjoint_and_cover_the_epoch(
    s3_text: tuple[str, dict, np.ndarray], world: int
) -> None:
    url, opts, rows = s3_text
    per_rank = s3_ids(url, opts, world, seed=4)
    flat = [i for rank in per_rank for b in rank for i in b]
    assert len(flat) == len(set(flat)) == N // G * G
    assert merge(per_rank) == merge(s3_ids(url, opts, 1, seed=4))


def test_resume_over_s3_with_a_world_size_change(s3_text: tuple[str, dict, np.ndarray]) -> None:
    url, opts, _ = s3_text
    full = merge(s3_ids(url, opts, 1, seed=8))
    head, state = [], None
    for r in range(4):
        ds = StreamingDataset(
            url,
            global_batch_size=G,
            seed=8,
            rank=r,
            world_size=4,
            batched=True,
            storage_options=opts,
        )
        it = iter(ds)
        head.append([ids_of(next(it)) for _ in range(7)])
        state = ds.state_dict()
    rest = []
    for r in range(2):
        ds = StreamingDataset(
            url,
            global_batch_size=G,
            seed=8,
            rank=r,
            world_size=2,
            batched=True,
            storage_options=opts,
        )
        ds.load_state_dict(state)
        rest.append([ids_of(b) for b in ds.loader()])
    assert merge(head) + merge(rest) == full


@pytest.mark.slow
def test_server_killed_mid_epoch_and_restarted_loses_nothing(
    seaweed: SeaweedS3, s3_text: tuple[str, dict, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    url, opts, rows = s3_text
    kw = dict(global_batch_size=G, seed=2, rank=0, world_size=1, batched=True, shuffle_window=1)
    reference = [ids_of(b) for b in StreamingDataset(url, storage_options=opts, **kw)]
    # One shard per window and one shard of prefetch: most shards are fetched after the crash.
    ds = StreamingDataset(
        url,
        prefetch=1,
        num_threads=1,
        retry=RetryPolicy(max_attempts=10),
        storage_options=opts,
        **kw,
    )
    it = iter(ds)
    got = [ids_of(next(it)) for _ in range(3)]
    fetched_before = ds.stats.shards_fetched
    seaweed.kill()
    restarter = threading.Timer(1.0, seaweed.start)
    restarter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_transformer.data"):
            for b in it:
                got.append(ids_of(b))
                np.testing.assert_array_equal(b.numpy().astype(np.uint8), rows[ids_of(b)])
    finally:
        restarter.join()
        if not seaweed.running:
            seaweed.start()
    assert got == reference  # same samples, same order: none lost, none repeated
    assert ds.stats.shards_fetched - fetched_before >= 10
    retried = [r.getMessage() for r in caplog.records if "transient failure" in r.getMessage()]
    assert retried and f"{url}/train/" in retried[0]  # botocore's retries, naming the shard


def test_corrupted_shard_on_s3_fails_clearly_and_fast(s3: tuple[str, dict], tmp_path: Path) -> None:
    bucket, opts = s3
    make_indexed_text(tmp_path / "in.bin", n=50)
    url = f"{bucket}/ds"
    prepare(
        "text",
        url,
        path=str(tmp_path / "in.bin"),
        seq_len=SEQ,
        shard_bytes=SEQ * 10,
        fractions=(1, 0, 0),
        storage_options=opts,
    )
    fs = fsspec.filesystem(
        "s3",
        **{k: v for k, v in opts.items() if k != "endpoint_url"},
        client_kwargs={"endpoint_url": opts["endpoint_url"]},
    )
    key = url.removeprefix("s3://") + "/train/00002.parquet"
    blob = bytearray(fs.cat_file(key))
    blob[100] ^= 0x01
    fs.pipe_file(key, bytes(blob))
    kw = dict(global_batch_size=10, rank=0, world_size=1, shuffle=False, storage_options=opts)
    t0 = time.monotonic()
    with pytest.raises(ChecksumMismatchError, match=rf"shard {url}/train/00002\.parquet: sha256"):
        list(StreamingDataset(url, **kw))
    check_shards(load_manifest(url, opts), opts)  # same size: only the sha256 tells
    fs.rm_file(key)
    with pytest.raises(MissingShardError, match=rf"shard {url}/train/00002\.parquet: not found"):
        list(StreamingDataset(url, **kw))
    with pytest.raises(MissingShardError, match=r"not in storage: train/00002\.parquet$"):
        check_shards(load_manifest(url, opts), opts)
    assert time.monotonic() - t0 < 10  # permanent errors are not retried


def test_failed_prepare_on_s3_leaves_no_manifest_or_shards(
    s3: tuple[str, dict], tmp_path: Path
) -> None:
    import zipfile

    bucket, opts = s3
    d = tmp_path / "raw"
    d.mkdir()
    make_npz(d / "train_data_batch_1.npz", 5, seed=1)
    make_npz(d / "val_data.npz", 3, seed=2)
    with zipfile.ZipFile(d / "val_data.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["data.npy"] = members["data.npy"][:4000]
    with zipfile.ZipFile(d / "val_data.npz", "w") as z:
        for n, blob in members.items():
            z.writestr(n, blob)
    url = f"{bucket}/in64"
    with pytest.raises(MalformedSourceError, match=r"val_data\.npz"):
        prepare(
            "imagenet64",
            url,
            path=str(d),
            validation_size=1,
            shard_bytes=12288,
            storage_options=opts,
        )
    fs = fsspec.filesystem(
        "s3",
        key=opts["key"],
        secret=opts["secret"],
        client_kwargs={"endpoint_url": opts["endpoint_url"]},
    )
    fs.invalidate_cache()
    # No shard or manifest is left (SeaweedFS may list the emptied directory itself).
    objects = fs.find(url.removeprefix("s3://"))
    assert [o for o in objects if o.endswith((".parquet", ".json"))] == []


def test_unreachable_endpoint_gives_up_within_the_retry_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    (port,) = free_ports(1)  # nothing listens there: every connect is refused
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
    policy = RetryPolicy(max_attempts=3)
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="sparse_transformer.data"),
        pytest.raises(RetriesExhaustedError, match=r"manifest s3://nobucket/ds/manifest\.json"),
    ):
        StreamingDataset(
            "s3://nobucket/ds", global_batch_size=1, storage_options=opts, retry=policy
        )
    assert time.monotonic() - t0 < 20  # botocore's waits before retries 1 and 2: at most 1 + 2 s
    retried = [r.getMessage() for r in caplog.records if "transient failure" in r.getMessage()]
    assert len(retried) == 2 and "(attempt 1/3): EndpointConnectionError" in retried[0]
    assert "s3://nobucket/ds/manifest.json" in retried[0]


class ScriptedS3:
    """What a loopback S3 endpoint answers: (method, path) -> responses, the last repeating
    (404 NoSuchKey when unscripted), and how often each was asked."""

    def __init__(self) -> None:
        self.responses: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self.hits: dict[tuple[str, str], int] = {}


@pytest.fixture
def scripted_s3() -> Iterator[tuple[dict, ScriptedS3]]:
    script = ScriptedS3()
    codes = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, method: str) -> None:
            key = (method, self.path.split("?")[0])
            n = script.hits.get(key, 0)
            script.hits[key] = n + 1
            replies = script.responses.get(key, [(404, b"")])
            status, body = replies[min(n, len(replies) - 1)]
            if status >= 300:
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{codes[status]}</Code>"
                    f"<Message>scripted</Message></Error>"
                ).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method == "GET":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.answer("GET")

        def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
            self.answer("HEAD")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}", "key": "k"}
    try:
        yield {**opts, "secret": "s"}, script
    finally:
        server.shutdown()
        server.server_close()


def test_s3_server_errors_are_retried_by_the_client_and_logged(
    scripted_s3: tuple[dict, ScriptedS3], caplog: pytest.LogCaptureFixture
) -> None:
    opts, script = scripted_s3
    manifest = Manifest(seq_len=8, tokenizer={}, source={}, splits={"train": SplitInfo([], 0, 0)})
    body = manifest.to_json().encode()
    key = "/b/ok/manifest.json"
    script.responses[("HEAD", key)] = [(503, b""), (200, body)]
    script.responses[("GET", key)] = [(500, b""), (200, body)]
    with caplog.at_level(logging.WARNING, logger="sparse_transformer.data"):
        loaded = load_manifest("s3://b/ok", opts, RetryPolicy(max_attempts=3))
    assert loaded.to_json() == manifest.to_json()
    assert script.hits[("HEAD", key)] == 2 and script.hits[("GET", key)] == 2
    retried = [r.getMessage() for r in caplog.records if "transient failure" in r.getMessage()]
    assert len(retried) == 2
    assert retried[0].startswith("HeadObject s3://b/ok/manifest.json: transient failure")
    assert "GetObject" in retried[1] and "HTTP Error 500 InternalError" in retried[1]

    caplog.clear()
    key = "/b/down/manifest.json"
    script.responses[("HEAD", key)] = [(500, b"")]
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="sparse_transformer.data"),
        pytest.raises(RetriesExhaustedError, match=r"manifest s3://b/down/manifest\.json: giving"),
    ):
        load_manifest("s3://b/down", opts, RetryPolicy(max_attempts=3))
    assert script.hits[("HEAD", key)] == 3  # max_attempts requests, no layer on top
    assert time.monotonic() - t0 < 10
    assert sum("transient failure" in r.getMessage() for r in caplog.records) == 2


def test_s3_403_and_404_are_not_retried(scripted_s3: tuple[dict, ScriptedS3]) -> None:
    opts, script = scripted_s3
    script.responses[("HEAD", "/b/secret/manifest.json")] = [(403, b"")]
    t0 = time.monotonic()
    with pytest.raises(PermissionError):
        load_manifest("s3://b/secret", opts)
    assert script.hits[("HEAD", "/b/secret/manifest.json")] == 1
    with pytest.raises(ManifestError, match=r"s3://b/gone/manifest\.json: no manifest"):
        load_manifest("s3://b/gone", opts)
    assert script.hits[("HEAD", "/b/gone/manifest.json")] == 1
    assert time.monotonic() - t0 < 5


def test_cli_prepare_and_inspect_over_s3(
    s3: tuple[str, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from sparse_transformer.data.cli import register

    bucket, opts = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    make_indexed_text(tmp_path / "in.bin", n=40)
    parser = argparse.ArgumentParser(prog="sparse-transformer")
    register(parser.add_subparsers())
    url = f"{bucket}/cli"

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert (
        run(
            "data",
            "prepare",
            "text",
            "--out",
            url,
            "--path",
            str(tmp_path / "in.bin"),
            "--seq-len",
            str(SEQ),
            "--shard-mb",
            str(SEQ * 10 / 2**20),
            "--endpoint-url",
            opts["endpoint_url"],
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train" in out and "36 samples" in out
    assert run("data", "inspect", url, "--verify", "--endpoint-url", opts["endpoint_url"]) == 0
    out = capsys.readouterr().out
    assert "verified: all shards match the manifest" in out
    assert opts["secret"] not in out

    fs = fsspec.filesystem(
        "s3",
        key=opts["key"],
        secret=opts["secret"],
        client_kwargs={"endpoint_url": opts["endpoint_url"]},
    )
    key = url.removeprefix("s3://") + "/train/00001.parquet"
    fs.pipe_file(key, b"PAR1 not really")
    assert run("data", "inspect", url, "--verify", "--endpoint-url", opts["endpoint_url"]) == 1
    out = capsys.readouterr().out
    assert "BAD train/1" in out and "00001.parquet" in out and "1 bad shards" in out
    assert run("data", "inspect", f"{bucket}/missing", "--endpoint-url", opts["endpoint_url"]) == 1
    assert "no manifest" in capsys.readouterr().err
