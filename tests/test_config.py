"""The training config: typed loading, overrides, validation naming the field (the one
validator of configs.schema, shared with the model config), redaction, the DeepSpeed JSON
and Ray configs derived from it, and the CLI's help and early failures."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import yaml

from sparse_transformer.cli import build_parser, main
from sparse_transformer.configs.schema import Noun, Range, build
from sparse_transformer.distributed.config import (
    Config,
    ConfigError,
    deepspeed_config,
    dump_yaml,
    load_config,
    parse_override,
    resolve_compile,
)
from sparse_transformer.distributed.redaction import REDACTED, redact
from sparse_transformer.model import list_model_configs, load_model_config


def test_every_packaged_config_loads_and_model_loader_ignores_other_sections() -> None:
    for name in list_model_configs():
        cfg = load_config(name)
        assert cfg.run.name == name
        assert cfg.model == load_model_config(name)  # the model loader reads model: only


def test_tiny_is_the_embedded_default() -> None:
    cfg = load_config()
    assert cfg.model.n_layers == 4 and cfg.model.d_model == 128
    assert cfg.scaling.num_workers == 2 and cfg.data.source == "wiki-sample"
    assert cfg.run.storage_path == "runs" and cfg.run.ray_address == "local"


def test_overrides_are_typed_by_the_field() -> None:
    cfg = load_config(
        "tiny",
        [
            "train.lr=3e-4",
            "train.steps=7",
            "train.betas=[0.8, 0.9]",
            "train.deterministic=true",
            "scaling.num_workers=1",
            "model.n_layers=2",
            "run.storage_options.endpoint_url=http://127.0.0.1:1",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.train.betas == [0.8, 0.9]
    assert cfg.train.deterministic is True and cfg.scaling.num_workers == 1
    assert cfg.model.n_layers == 2
    assert cfg.run.storage_options == {"endpoint_url": "http://127.0.0.1:1"}
    assert parse_override("train.lr=1") == (["train", "lr"], 1)
    cfg = load_config("tiny", ["train.lr=1"])  # an int widens to the float field
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=abc", "train.lr: expected float, got 'abc'"),
        ("train.steps=1.5", "train.steps: expected int, got 1.5"),
        ("train.deterministic=3", "train.deterministic: expected bool, got 3"),
        ("train.nope=1", "train.nope: unknown field"),
        ("bogus.x=1", "bogus: unknown section"),
        ("model.n_heads=3", "model.d_model"),
        ("model.colour=red", "model.colour: unknown field"),
        ("data.global_batch_size=5", "data.global_batch_size: 5 is not divisible"),
        ("train.grad_accum=4", "data.global_batch_size: 4 is not divisible by workers x"),
        ("data.seq_len=2048", "data.seq_len: 2048 exceeds the model's context"),
        ("train.precision=fp8", "train.precision: expected one of"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("scaling.min_workers=3", "scaling.min_workers"),
        ("train.steps=0", "train.steps: must be > 0"),
        ("model.compile=maybe", "model.compile: must be true, false, auto or cudagraphs"),
        ("model.attention_backend=sdpa", "model.attention_backend: sdpa runs dense"),
        ("run.max_failures=-2", "run.max_failures: must be an integer >= -1, got -2"),
        ("run.max_failures=-1", None),  # unlimited
        ("scaling.use_gpu=maybe", "scaling.use_gpu: expected one of"),
        ("train.zero_stage=1.0", "train.zero_stage: expected one of (0, 1, 2, 3), got 1.0"),
        ("train.betas=[0.9, x]", "train.betas[1]: expected float, got 'x'"),
        ("scaling.resources_per_worker={a: x}", "scaling.resources_per_worker.a: expected float"),
        ("model.embed_shape=[1024, 0]", "model.embed_shape[1]: must be an integer >= 1"),
        ("train.fault_step=3", "train.fault_step: unknown field"),  # faults are test hooks
    ],
)
def test_invalid_values_fail_naming_the_field(override: str, message: str | None) -> None:
    if message is None:
        load_config("tiny", [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert message in str(err.value)


def test_one_validator_for_the_model_and_the_run() -> None:
    """configs.schema checks every field of both configs against its annotation: the
    model's errors are the same ConfigError, named under ``model.`` when read in a run."""
    from sparse_transformer.configs import schema
    from sparse_transformer.model import SparseTransformerConfig

    assert ConfigError is schema.ConfigError
    with pytest.raises(ConfigError, match=r"^SparseTransformerConfig\.n_layers: expected int"):
        SparseTransformerConfig(n_layers="2")
    with pytest.raises(ConfigError, match=r"^model\.n_layers: expected int, got 'x'"):
        load_config("tiny", ["model.n_layers=x"])
    yes = load_config("tiny", ["scaling.use_gpu=yes", "run.dashboard=false"])
    assert yes.scaling.use_gpu == "true" and yes.run.dashboard == "false"  # YAML booleans


@dataclass
class Inner:
    size: Annotated[int, Range(ge=1)] = 1
    kind: Annotated[Literal["a", "b"], Noun("kind")] = "a"


@dataclass
class Outer:
    rate: Annotated[float, Range(ge=0, lt=1)] = 0.5
    flag: bool = False
    label: Optional[str] = None  # noqa: UP045 - typing.Optional, the spelling under test
    mode: bool | Literal["auto"] = "auto"
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, int] = field(default_factory=dict)
    shape: tuple[int, ...] = ()


def test_schema_checks_each_kind_of_annotation() -> None:
    got = build(
        Outer,
        {"rate": 0, "label": None, "mode": True, "inner": {"size": 2, "kind": "b"},
         "extra": {"k": 3}, "shape": [1, 2]},
        "outer",
    )  # fmt: skip
    assert got == Outer(0.0, False, None, True, Inner(2, "b"), {"k": 3}, (1, 2))
    assert isinstance(got.rate, float)
    for values, message in [
        ({"rate": 1}, "outer.rate: must be in [0, 1), got 1.0"),
        ({"rate": True}, "outer.rate: expected float, got True"),
        ({"flag": "yes"}, "outer.flag: expected bool, got 'yes'"),
        ({"label": 3}, "outer.label: expected str or None, got 3"),
        ({"mode": "on"}, "outer.mode: must be true, false or auto, got 'on'"),
        ({"inner": {"size": 0}}, "outer.inner.size: must be an integer >= 1, got 0"),
        ({"inner": {"kind": "c"}}, "outer.inner.kind: unknown kind 'c'; expected one of"),
        ({"inner": {"colour": 1}}, "outer.inner.colour: unknown field; known fields: size"),
        ({"inner": [1]}, "outer.inner: expected a mapping, got [1]"),
        ({"extra": {"k": 1.5}}, "outer.extra.k: expected int, got 1.5"),
        ({"shape": [1, "x"]}, "outer.shape[1]: expected int, got 'x'"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(Outer, values, "outer")
        assert str(err.value).startswith(message), (values, str(err.value))


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="train.precision: fp16 needs GPUs"):
        load_config("tiny", ["scaling.use_gpu=false", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="data.url: required when run.storage_path is remote"):
        load_config("tiny", ["run.storage_path=s3://bucket/runs"])
    # elastic (min, max): every world size in the range must divide the batch
    with pytest.raises(ConfigError, match="not divisible by workers x train.grad_accum = 3 x 1"):
        load_config("tiny", ["scaling.min_workers=1", "scaling.num_workers=4"])
    assert load_config("tiny", ["scaling.min_workers=1", "data.global_batch_size=4"])


def test_yaml_file_and_unknown_names(tmp_path: Path) -> None:
    doc = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    doc["train"]["steps"] = 3
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(str(path))
    assert cfg.train.steps == 3 and cfg.run.name == "mine"
    with pytest.raises(ConfigError, match="unknown name 'nope'"):
        load_config("nope")
    doc["train"]["lr"] = "fast"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="train.lr: expected float, got 'fast'"):
        load_config(str(path))


def test_redact_hides_credentials_everywhere() -> None:
    obj = {
        "run": {
            "storage_options": {
                "key": "AKIAXXXX",
                "secret": "s3cr3t",
                "endpoint_url": "http://user:pw@127.0.0.1:8333",
            },
            "num_to_keep": 2,
        },
        "env": {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x", "HOME": "/root"},
        "list": [{"api_token": "tv-1"}, {"password": "pv-2"}, {"Credentials": {"a": "cv-3"}}],
        "aws_session_token": "sess-0042",
    }
    out = redact(obj)
    text = repr(out)
    for secret in ("AKIAXXXX", "s3cr3t", ":pw@", "AKIA", "sess-0042", "tv-1", "pv-2", "cv-3"):
        assert secret not in text
    assert out["run"]["storage_options"]["key"] == REDACTED
    assert out["run"]["storage_options"]["endpoint_url"] == "http://***@127.0.0.1:8333"
    assert out["run"]["num_to_keep"] == 2 and out["env"]["HOME"] == "/root"
    assert out["list"][2]["Credentials"] == REDACTED
    assert obj["run"]["storage_options"]["secret"] == "s3cr3t"  # the input is not modified
    cfg = load_config("tiny", ["data.storage_options.secret=hunter2", "data.url=file:///x"])
    assert "hunter2" not in dump_yaml(cfg) and "hunter2" not in repr(redact(cfg))


@pytest.mark.parametrize("key", ["creds", "gcp_creds", "sk", "stripe-sk", "db_pass", "pwd"])
def test_redact_hides_short_secret_names(key: str) -> None:
    assert redact({key: "v-4242"}) == {key: REDACTED}


@pytest.mark.parametrize("key", ["task", "ask", "bypass", "auth", "disk", "path"])
def test_redact_keeps_names_that_only_contain_those_letters(key: str) -> None:
    assert redact({key: "plain"}) == {key: "plain"}


def test_deepspeed_config_from_the_tree() -> None:
    cfg = load_config(
        "enwik8",
        [
            "train.initial_scale_power=12",
            "train.loss_scale_window=200",
            "train.hysteresis=3",
            "train.min_loss_scale=0.5",
            "train.zero_stage=2",
            "data.global_batch_size=16",
            "train.grad_accum=2",
            "scaling.num_workers=4",
            "run.storage_path=/tmp/x",
        ],
    )
    ds = deepspeed_config(cfg, 4, on_gpu=True)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 200,
        "hysteresis": 3,
        "min_loss_scale": 0.5,
    }
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    sched = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and sched["warmup_type"] == "linear"
    assert sched["warmup_num_steps"] == min(5000, cfg.train.steps)
    cpu = deepspeed_config(load_config("tiny"), 2, on_gpu=False)
    assert not cpu["fp16"]["enabled"] and not cpu["bf16"]["enabled"]  # fp32 on the CPU
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    bf16 = deepspeed_config(load_config("tiny", ["train.precision=bf16"]), 2, on_gpu=False)
    assert bf16["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        deepspeed_config(load_config("tiny", ["train.precision=fp16"]), 2, on_gpu=False)


def test_ray_configs_from_the_tree(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from sparse_transformer.distributed.trainer import storage_filesystem

    cfg = load_config("tiny", [f"run.storage_path={tmp_path}"])
    assert storage_filesystem(cfg) == (None, str(tmp_path))
    s3 = load_config(
        "tiny",
        [
            "run.storage_path=s3://bucket/runs",
            "data.url=s3://bucket/data",
            "run.storage_options={endpoint_url: 'http://127.0.0.1:8333', key: a, secret: b}",
        ],
    )
    fs, path = storage_filesystem(s3)
    s3fs = fs.handler.fs  # pyarrow over the same fsspec filesystem the readers use
    assert path == "bucket/runs" and type(s3fs).__name__ == "S3FileSystem"
    assert s3fs.client_kwargs.get("endpoint_url", s3fs.endpoint_url) == "http://127.0.0.1:8333"


def test_config_round_trips() -> None:
    cfg = load_config("tiny", ["train.steps=5"])
    again = Config.from_dict(cfg.to_dict(), name="tiny")
    assert again == cfg


def test_cli_help_lists_the_commands() -> None:
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("train", "eval", "sample"):
        assert cmd in text
    for cmd in ("train", "eval", "sample"):
        out = subprocess.run(
            [sys.executable, "-m", "sparse_transformer", cmd, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "usage: sparse-transformer " + cmd in out.stdout
    assert (
        "key=value"
        in subprocess.run(
            [sys.executable, "-m", "sparse_transformer", "train", "--help"],
            capture_output=True,
            text=True,
        ).stdout
    )


def test_cli_train_fails_early(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "train.lr=abc"]) == 2
    assert "train.lr: expected float, got 'abc'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", f"run.storage_path={blocker}/runs", "run.dashboard=false"]) == 3
    err = capsys.readouterr().err
    assert f"{blocker}/runs" in err and "not reachable or not writable" in err
    assert main(["train", "--print-config", "data.storage_options.token=abc"]) == 0
    out = capsys.readouterr().out
    assert "token: '***'" in out and "abc" not in out


class WrappedError(Exception):
    """Shaped like Ray's RayTaskError: the worker's exception is ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause

    def __str__(self) -> str:
        return "Traceback (most recent call last):\n" + "x\n" * 5000


def test_worker_failures_are_described_rank_by_rank() -> None:
    from sparse_transformer.distributed.failures import WorkerRankError
    from sparse_transformer.distributed.trainer import TrainingError

    long_tb = "\n".join(f"  frame {i}" for i in range(3000))
    err = TrainingError(
        {
            1: WrappedError(WorkerRankError(1, ValueError("bad b"), long_tb)),
            0: WrappedError(WorkerRankError(0, ValueError("bad a"), long_tb)),
        }
    )
    lines = str(err).splitlines()
    assert lines[0] == "training failed on 2 worker(s), ranks 0, 1:"
    assert lines[1] == "  rank 0: ValueError: bad a"
    assert lines[2] == "  rank 1: ValueError: bad b"
    assert lines[3] == "--- rank 0 in full ---"
    assert lines[4] == "training worker rank 0 failed: ValueError: bad a"
    assert lines[5] == "--- worker traceback (rank 0) ---" and lines[-1] == "  frame 2999"
    import pickle

    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_compile_resolution() -> None:
    """auto compiles on GPUs only and never under ZeRO-3, whose hooks a compiled block
    cannot hold; asking for both is refused."""
    assert resolve_compile(load_config("tiny"), on_gpu=True) == "default"
    assert resolve_compile(load_config("tiny"), on_gpu=False) is None
    assert resolve_compile(load_config("tiny", ["model.compile=true"]), on_gpu=False) == "default"
    assert resolve_compile(load_config("tiny", ["model.compile=false"]), on_gpu=True) is None
    assert resolve_compile(load_config("tiny", ["train.zero_stage=3"]), on_gpu=True) is None
    cudagraphs = load_config("tiny", ["model.compile=cudagraphs"])
    assert resolve_compile(cudagraphs, on_gpu=True) == "reduce-overhead"
    for value in ("true", "cudagraphs"):
        with pytest.raises(ConfigError, match="model.compile: ZeRO stage 3"):
            load_config("tiny", [f"model.compile={value}", "train.zero_stage=3"])


def test_one_set_of_redaction_rules() -> None:
    """The trainer's config dump, ``submit``'s output and the checkpoints' config share one
    module; a number under a credential's name is masked, a count under a key-ish name is
    not, and free text in a config value is scanned too."""
    from sparse_transformer.distributed import submit, trainer

    assert submit.redact is redact and trainer.redact is redact
    out = redact({"password": 123456, "num_keys": 3, "max_tokens": 512, "note": "api_key=abcdef12"})
    assert out == {"password": REDACTED, "num_keys": 3, "max_tokens": 512, "note": "api_key=***"}


def test_one_rule_for_config_names(tmp_path: Path) -> None:
    """The trainer's --config, the model loader and submit's --config resolve names and
    paths by the one rule of ``configs.resolve`` and refuse the same things."""
    from sparse_transformer import configs
    from sparse_transformer.distributed import submit
    from sparse_transformer.distributed.config import resolve_config_path

    own = tmp_path / "mine.yml"
    own.write_text((configs.configs_dir() / "tiny.yaml").read_text())
    for arg, name in (("tiny", "tiny"), (str(own), "mine")):
        path, got = resolve_config_path(arg)
        assert got == name and submit._find_config(arg) == path.resolve()
        assert load_model_config(arg) == load_model_config(path)
    for bad in ("tinny", str(tmp_path / "absent.yaml")):
        with pytest.raises(ConfigError, match="--config: "):
            resolve_config_path(bad)
        with pytest.raises((ValueError, FileNotFoundError), match="model config: "):
            load_model_config(bad)
        with pytest.raises(SystemExit, match=f"--config {bad}: "):
            submit._find_config(bad)
