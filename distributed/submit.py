"""``sparse-transformer submit`` and ``sparse-transformer jobs``: training as Ray jobs.

    sparse-transformer submit [--address http://HOST:8265] [--config NAME_OR_PATH]
                              [--follow] [--job-id ID] [--env NAME ...] [key=value ...]
    sparse-transformer jobs list|status|logs|stop [JOB_ID]

``submit`` sends ``python -m sparse_transformer train --config ... key=value ...``
to a Ray cluster through Ray's ``JobSubmissionClient``. The job's working
directory is a snapshot of this project: a staging folder holding the package as
``sparse_transformer/`` (so that the job's driver and every Ray worker import the
code you submitted), without the virtual environment, git data, data caches,
runs and checkpoints. The runtime environment is derived from the config: its
optional ``runtime_env:`` section (``pip``, ``env_vars``, ...) is merged into the
one ``submit`` builds.

Security defaults:

* the address defaults to ``http://127.0.0.1:8265`` (``--address``, else
  ``RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``RAY_ADDRESS``);
* Ray 2.60's token authentication: the token is read from Ray's usual places
  (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
  ``~/.ray/auth_token``) and sent as a bearer header; it is never printed;
* credentials never travel on the command line (a ``key=value`` override whose
  key looks like a credential is refused: they come from the environment or the
  provider's chain on the cluster, or from ``--env NAME``, which forwards a
  variable of the submitting shell in the runtime environment); everything
  printed (the runtime environment, entrypoints, followed logs) is redacted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparse_transformer import configs
from sparse_transformer.distributed.redaction import (
    REDACTED,
    is_credential_name,
    mask_values,
    redact,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

#: The project root (this package's directory).
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Never part of a job's working directory (names or glob patterns, any depth).
EXCLUDES: tuple[str, ...] = (
    ".venv",
    "venv",
    ".git",
    ".whl",
    "*.whl",
    "runs",
    "data_cache",
    "checkpoints",
    "benchmarks/results",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "build",
    "dist",
    ".gl",
    "out",
    "*.pt",
    "*.parquet",
    "*.ckpt",
    ".device",
)


def _known_secret_values(token: str | None) -> list[str]:
    """The auth token and the values of credential-like variables of this shell."""
    values = [token] if token else []
    values += [v for k, v in os.environ.items() if is_credential_name(k) and v]
    return values


# ------------------------------------------------------------- connection


def resolve_address(address: str | None) -> str:
    """The job server's HTTP address: the argument, else Ray's variables, else loopback."""
    if address:
        return address.rstrip("/")
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    return DEFAULT_ADDRESS


def auth_token() -> str | None:
    """Ray's authentication token from its usual places, or None.

    Uses Ray's own loader (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``) regardless of ``RAY_AUTH_MODE`` on this machine, since
    the cluster, not the client, decides whether it is required;
    ``RAY_AUTH_MODE=disabled`` sends none.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # pragma: no cover - minimal Ray installs
        AuthenticationTokenLoader = None  # noqa: N806
    if AuthenticationTokenLoader is not None:
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        try:
            if not loader.has_token(ignore_auth_mode=True):
                return None
            token = loader.get_raw_token(ignore_auth_mode=True)
        except Exception as err:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
            raise SystemExit(f"Ray authentication token: {err}") from None
        return token.strip() or None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer ..."}`` when a token is available, else ``{}``."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` that authenticates with Ray's token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(resolve_address(address), headers=auth_headers())


def _is_loopback(address: str) -> bool:
    host = urllib.parse.urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------ working dir


def _ignore(root: Path, excludes: Iterable[str]):
    import fnmatch

    patterns = list(excludes)

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel_dir = Path(directory).resolve().relative_to(root)
        out = set()
        for name in names:
            rel = (rel_dir / name).as_posix()
            if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns):
                out.add(name)
        return out

    return ignore


def stage_working_dir(
    dest: Path, root: Path = PROJECT_ROOT, excludes: Iterable[str] = EXCLUDES
) -> Path:
    """Copy the project into ``dest/sparse_transformer`` without ``excludes``; returns ``dest``."""
    root = root.resolve()
    shutil.copytree(root, dest / "sparse_transformer", ignore=_ignore(root, excludes))
    return dest


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------- config + env


def _find_config(name_or_path: str) -> Path:
    """The config file ``--config`` names (``configs.resolve``: the trainer's own rule)."""
    try:
        return configs.resolve(name_or_path)[0].resolve()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--config {name_or_path}: {err}") from None


def _split_overrides(items: list[str]) -> list[str]:
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"overrides are key=value, got {item!r}")
        if is_credential_name(key.rsplit(".", 1)[-1]):
            raise SystemExit(
                f"refusing to put the credential-like override {key!r} on the job's command "
                "line (it would be visible in the dashboard): give it to the cluster through "
                "the environment or the provider's credential chain, or forward a variable "
                "with --env NAME"
            )
    return items


def build_runtime_env(
    config_path: Path | None,
    working_dir: str,
    forward_env: Iterable[str] = (),
    excludes: Iterable[str] = EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime environment: the staged project, the config's ``runtime_env:``.

    ``forward_env`` names variables of this shell to pass to the job (their
    values are never printed).
    """
    env: dict[str, Any] = {
        "working_dir": working_dir,
        "excludes": list(excludes),
        "env_vars": {
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        },
    }
    if config_path is not None:
        import yaml

        cfg = yaml.safe_load(config_path.read_text()) or {}
        extra = cfg.get("runtime_env") or {}
        if not isinstance(extra, dict):
            raise SystemExit(f"{config_path}: runtime_env must be a mapping")
        for key, value in extra.items():
            if key == "env_vars":
                env["env_vars"].update({str(k): str(v) for k, v in value.items()})
            elif key in ("working_dir", "excludes"):
                raise SystemExit(f"{config_path}: runtime_env.{key} is set by submit")
            else:
                env[key] = value
    for name in forward_env:
        if name not in os.environ:
            raise SystemExit(f"--env {name}: not set in this shell")
        env["env_vars"][name] = os.environ[name]
    return env


def default_job_id(config: str | None) -> str:
    """``sparse-transformer-CONFIG-YYYYmmdd-HHMMSS-RAND``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(config).stem if config else "default").strip("-")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"sparse-transformer-{name}-{stamp}-{secrets.token_hex(3)}"


# --------------------------------------------------------------- handlers


def _print(*parts: Any, file: Any = None) -> None:
    print(*(redact(p) for p in parts), file=file, flush=True)


def _follow(job_client: Any, job_id: str, secret_values: list[str]) -> int:
    """Stream a job's logs until it ends; 0 if it succeeded."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            sys.stdout.write(mask_values(chunk, secret_values))
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        _print(f"\nstopped following; the job goes on: sparse-transformer jobs stop {job_id}")
        return 130
    status = job_client.get_job_status(job_id)
    # The log stream can close a moment before the status turns terminal.
    for _ in range(50):
        if status.is_terminal():
            break
        time.sleep(0.2)
        status = job_client.get_job_status(job_id)
    info = job_client.get_job_info(job_id)
    message = f": {info.message}" if info.message else ""
    _print(f"job {job_id} {status.value}{message}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def submit_job(
    command: list[str],
    *,
    address: str | None = None,
    config_path: Path | None = None,
    forward_env: Iterable[str] = (),
    job_id: str | None = None,
    entrypoint_num_cpus: float = 0.0,
    max_upload_mib: float = 64.0,
) -> tuple[Any, str, str, dict[str, Any]]:
    """Submit ``command`` (run in a snapshot of the project) as a Ray job.

    Returns ``(client, job_id, entrypoint, runtime_env)``. A ``config_path``
    outside the project is shipped beside the package and ``--config`` in
    ``command`` pointing to it is rewritten.
    """
    with tempfile.TemporaryDirectory(prefix="sparse-transformer-job-") as tmp:
        staging = stage_working_dir(Path(tmp))
        size = _dir_size(staging)
        if size > max_upload_mib * 2**20:
            raise SystemExit(
                f"the working directory would upload {size / 2**20:.0f} MiB "
                f"(> --max-upload-mib {max_upload_mib}); add excludes or clean the tree"
            )
        if config_path is not None and not config_path.is_relative_to(PROJECT_ROOT):
            shutil.copy(config_path, staging / config_path.name)
        entrypoint = shlex.join(command)
        runtime_env = build_runtime_env(config_path, str(staging), forward_env)
        job_client = client(address)
        job_id = job_client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=job_id or default_job_id(str(config_path) if config_path else None),
            entrypoint_num_cpus=entrypoint_num_cpus,
            metadata={"submitted_by": "sparse-transformer submit"},
        )
    return job_client, job_id, entrypoint, runtime_env


def _absolute_paths(config: Path | str | None, overrides: list[str]) -> list[str]:
    """Overrides that make a relative ``run.storage_path`` / ``data.url`` absolute, on
    this machine: a job's working directory is a temporary copy (the trainer refuses
    relative paths inside a job). Each one is said on stderr."""
    from sparse_transformer.distributed.config import ConfigError, load_config, relative_paths

    try:
        cfg = load_config(str(config) if config else "tiny", overrides)
    except ConfigError as err:
        raise SystemExit(f"sparse-transformer submit: invalid config: {err}") from None
    out = []
    for field, value in relative_paths(cfg):
        resolved = os.path.abspath(os.path.expanduser(value))
        _print(
            f"{field}: {value} -> {resolved} (relative paths are resolved here; on a "
            "multi-node cluster give a path every node reaches, or s3://...)",
            file=sys.stderr,
        )
        out.append(f"{field}={resolved}")
    return out


def _submit(args: argparse.Namespace) -> int:
    overrides = _split_overrides(list(args.overrides or []))
    address = resolve_address(args.address)
    config_arg = args.config
    config_path = _find_config(config_arg) if config_arg else None
    python = args.python or (sys.executable if _is_loopback(address) else "python")
    cmd = [python, "-m", "sparse_transformer", "train"]
    if config_path is not None:
        if config_path.is_relative_to(PROJECT_ROOT):  # the same path in the snapshot
            rel = config_path.relative_to(PROJECT_ROOT).as_posix()
            cmd += ["--config", f"sparse_transformer/{rel}"]
        else:  # shipped beside the package
            cmd += ["--config", config_path.name]
    if not any(o.startswith("run.ray_address=") for o in overrides):
        # A job's driver joins the cluster it runs on (configs may say `local`,
        # which would start a private Ray inside the job).
        cmd.append("run.ray_address=auto")
    cmd += overrides + _absolute_paths(config_path, overrides)
    job_client, job_id, entrypoint, runtime_env = submit_job(
        cmd,
        address=address,
        config_path=config_path,
        forward_env=args.env or (),
        job_id=args.job_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        max_upload_mib=args.max_upload_mib,
    )
    forwarded = set(args.env or ())
    shown_env = dict(runtime_env, working_dir=f"<snapshot of {PROJECT_ROOT}>")
    shown_env["env_vars"] = {
        k: (REDACTED if k in forwarded else v) for k, v in runtime_env["env_vars"].items()
    }
    _print(f"address:     {address}", file=sys.stderr)
    _print(f"entrypoint:  {entrypoint}", file=sys.stderr)
    _print(f"runtime_env: {redact(shown_env)}", file=sys.stderr)
    _print(f"submitted job {job_id}")
    if not args.follow:
        _print(f"follow it: sparse-transformer jobs logs --follow {job_id}", file=sys.stderr)
        return 0
    return _follow(job_client, job_id, _known_secret_values(auth_token()))


def _one_line(handler: Any) -> Any:
    """A ``jobs`` handler whose job-server errors (no such job, unreachable server) are one
    line naming the command, exit 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (RuntimeError, OSError) as err:  # the SDK's request errors; requests' too
            _print(f"sparse-transformer jobs {args.jobs_command}: {err}", file=sys.stderr)
            return 2

    return run


def _jobs_list(args: argparse.Namespace) -> int:
    jobs = client(args.address).list_jobs()
    jobs.sort(key=lambda j: j.start_time or 0)
    _print(f"{'JOB ID':<52} {'STATUS':<10} {'STARTED (UTC)':<19} ENTRYPOINT")
    for j in jobs:
        started = (
            _dt.datetime.fromtimestamp(j.start_time / 1000, _dt.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            if j.start_time
            else "-"
        )
        job_id = j.submission_id or j.job_id or "-"
        _print(f"{job_id:<52} {j.status.value:<10} {started:<19} {j.entrypoint}")
    return 0


def _jobs_status(args: argparse.Namespace) -> int:
    info = client(args.address).get_job_info(args.job_id)
    _print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    job_client = client(args.address)
    secret_values = _known_secret_values(auth_token())
    if args.follow:
        return _follow(job_client, args.job_id, secret_values)
    sys.stdout.write(mask_values(job_client.get_job_logs(args.job_id), secret_values))
    sys.stdout.flush()
    return 0


def _jobs_stop(args: argparse.Namespace) -> int:
    job_client = client(args.address)
    stopped = job_client.stop_job(args.job_id)
    if not stopped:
        status = job_client.get_job_status(args.job_id)
        _print(f"{args.job_id} was not running ({status.value})")
        return 0
    _print(f"stop requested for {args.job_id}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = job_client.get_job_status(args.job_id)
        if status.is_terminal():
            _print(f"{args.job_id} {status.value}")
            return 0
        time.sleep(0.5)
    _print(f"{args.job_id} still {status.value} after {args.timeout:.0f}s", file=sys.stderr)
    return 1


# --------------------------------------------------------------- parsers


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help=f"the Ray job server (dashboard) URL; default RAY_API_SERVER_ADDRESS, an "
        f"http(s) RAY_ADDRESS, else {DEFAULT_ADDRESS}",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs list|status|logs|stop``."""
    p = subparsers.add_parser(
        "submit",
        help="submit training to a Ray cluster as a Ray job",
        description="Submit `sparse-transformer train` to a Ray cluster through Ray's job "
        "server, with a snapshot of this project as the working directory.",
    )
    _add_address(p)
    p.add_argument("--config", help="a config name (configs/NAME.yaml) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.add_argument("--job-id", help="the submission id (default: generated)")
    p.add_argument(
        "--env",
        action="append",
        metavar="NAME",
        help="forward this shell's variable NAME to the job (repeatable; never printed)",
    )
    p.add_argument(
        "--python",
        help="the interpreter on the cluster (default: this one for a loopback address, "
        "else `python`)",
    )
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0)
    p.add_argument("--max-upload-mib", type=float, default=64.0)
    p.set_defaults(func=_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, tail and stop Ray jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    q = jsub.add_parser("list", help="every job on the cluster")
    _add_address(q)
    q.set_defaults(func=_one_line(_jobs_list))
    q = jsub.add_parser("status", help="a job's status")
    _add_address(q)
    q.add_argument("job_id")
    q.set_defaults(func=_one_line(_jobs_status))
    q = jsub.add_parser("logs", help="a job's logs")
    _add_address(q)
    q.add_argument("job_id")
    q.add_argument("--follow", action="store_true", help="stream until the job ends")
    q.set_defaults(func=_one_line(_jobs_logs))
    q = jsub.add_parser("stop", help="stop a running job")
    _add_address(q)
    q.add_argument("job_id")
    q.add_argument("--no-wait", action="store_true", help="do not wait for it to end")
    q.add_argument("--timeout", type=float, default=60.0)
    q.set_defaults(func=_one_line(_jobs_stop))
