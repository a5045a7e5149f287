"""The manifest: the JSON file that describes a prepared dataset and commits it.

A dataset directory holds ``manifest.json`` and one folder of Parquet shards per
split. The manifest lists, per split, every shard with its sample count, its
byte size and its sha256, plus the source it was made from and the tokenizer
that turned the source into uint8 tokens. ``prepare`` writes it last: a
directory without a manifest is not a dataset, whatever shards it holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sparse_transformer.data import storage
from sparse_transformer.data.errors import ChecksumMismatchError, ManifestError, MissingShardError
from sparse_transformer.data.retry import RetryPolicy, giving_up

MANIFEST_NAME = "manifest.json"
FORMAT = "sparse-transformer-shards"
VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file: ``path`` is relative to the manifest's directory."""

    path: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """One split (train / validation / test): its shards in order."""

    shards: list[ShardInfo]
    num_samples: int
    num_tokens: int
    dropped_tokens: int = 0  # tokens of the source that did not fill a whole sequence

    @property
    def num_bytes(self) -> int:
        """Total size of the split's shard files."""
        return sum(s.num_bytes for s in self.shards)


@dataclass
class Manifest:
    """A prepared dataset: fixed-length uint8 token sequences in Parquet shards."""

    seq_len: int
    tokenizer: dict[str, Any]
    source: dict[str, Any]
    splits: dict[str, SplitInfo]
    compression: str = "zstd"
    created: str = ""
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # where it was loaded from (not serialised)

    @property
    def vocab_size(self) -> int:
        """Number of distinct token values (256 for every source here)."""
        return int(self.tokenizer.get("vocab_size", 256))

    def split(self, name: str) -> SplitInfo:
        """The split called ``name``; a clear error lists the ones that exist."""
        try:
            return self.splits[name]
        except KeyError:
            raise ManifestError(
                f"{self.url or 'manifest'}: no split {name!r}; it has {sorted(self.splits)}"
            ) from None

    def shard_url(self, shard: ShardInfo) -> str:
        """The absolute URL of ``shard`` (requires a manifest loaded from or saved to a URL)."""
        if self.url is None:
            raise ManifestError("manifest has no URL: load it with load_manifest()")
        return storage.join(self.url.rsplit("/", 1)[0], shard.path)

    def fingerprint(self, split: str) -> str:
        """A short hash of a split's shard list: identifies the data an order state refers to."""
        h = hashlib.sha256()
        h.update(str(self.seq_len).encode())
        for s in self.split(split).shards:
            h.update(s.sha256.encode())
            h.update(str(s.num_samples).encode())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        """The manifest as pretty-printed JSON."""
        d = asdict(self)
        d.pop("url")
        d = {
            "format": d.pop("format"),
            "version": d.pop("version"),
            **d,
        }
        for name, split in self.splits.items():
            d["splits"][name]["num_bytes"] = split.num_bytes
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, url: str | None = None) -> Manifest:
        """Parse a manifest; raises :class:`ManifestError` naming ``url`` when it is invalid."""
        where = url or "manifest"
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} manifest")
        if d.get("version") != VERSION:
            raise ManifestError(f"{where}: manifest version {d.get('version')} != {VERSION}")
        try:
            splits = {}
            for name, s in d["splits"].items():
                shards = [ShardInfo(**sh) for sh in s["shards"]]
                splits[name] = SplitInfo(
                    shards=shards,
                    num_samples=int(s["num_samples"]),
                    num_tokens=int(s["num_tokens"]),
                    dropped_tokens=int(s.get("dropped_tokens", 0)),
                )
                if sum(sh.num_samples for sh in shards) != splits[name].num_samples:
                    raise ManifestError(f"{where}: split {name}: shard sample counts do not add up")
            return cls(
                seq_len=int(d["seq_len"]),
                tokenizer=dict(d["tokenizer"]),
                source=dict(d["source"]),
                splits=splits,
                compression=d.get("compression", "zstd"),
                created=d.get("created", ""),
                extra=dict(d.get("extra", {})),
                url=url,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest: {type(e).__name__}: {e}") from e


def manifest_url(url: str) -> str:
    """The manifest URL for a dataset URL: ``.../manifest.json`` unless it already ends in .json."""
    url = storage.normalize_url(url)
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def load_manifest(
    url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> Manifest:
    """Read the manifest of the dataset at ``url`` (a directory or the manifest itself).

    The storage client retries transient failures as ``retry`` says (default
    :class:`RetryPolicy`; see :mod:`retry`); a missing manifest raises :class:`ManifestError`,
    which says the dataset was never completed.
    """
    url = manifest_url(url)
    fs, path = storage.filesystem(url, storage_options, retry or RetryPolicy())
    try:
        with giving_up(f"manifest {url}"):
            text = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(
            f"{url}: no manifest (the dataset does not exist or its preparation did not finish)"
        ) from None
    return Manifest.from_json(text, url=url)


def check_shards(manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Every shard the manifest lists is in storage with the size it records, or a
    :class:`MissingShardError` / :class:`ChecksumMismatchError` naming the first few that
    are not. One listing of the dataset folder: cheap enough to run before every run."""
    if manifest.url is None:
        raise ManifestError("manifest has no URL: load it with load_manifest()")
    root_url = manifest.url.rsplit("/", 1)[0]
    fs, root = storage.filesystem(root_url, storage_options)
    sizes = {path: int(info.get("size") or 0) for path, info in fs.find(root, detail=True).items()}
    prefix = root.rstrip("/")  # url_to_fs gives the path as find() names its files
    missing, resized = [], []
    for split in manifest.splits.values():
        for shard in split.shards:
            size = sizes.get(f"{prefix}/{shard.path}")
            if size is None:
                missing.append(shard.path)
            elif size != shard.num_bytes:
                resized.append(
                    f"{shard.path} ({size:,} bytes, the manifest says {shard.num_bytes:,})"
                )
    if missing:
        raise MissingShardError(
            f"{root_url}: {len(missing)} shard(s) the manifest lists are not in storage: "
            f"{_first(missing)}"
        )
    if resized:
        raise ChecksumMismatchError(
            f"{root_url}: {len(resized)} shard(s) differ from the manifest (replaced or "
            f"truncated): {_first(resized)}"
        )


def _first(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
