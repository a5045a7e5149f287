"""``submit`` and ``jobs`` against a real Ray head on 127.0.0.1 with token authentication.

The head is started with ``ray start --head`` on free loopback ports, its own
``--temp-dir`` and its own token file (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``), and stopped by killing exactly the processes it
started (``ray stop`` would kill every Ray process on the machine, including
other tests' clusters).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sparse_transformer.cli import main as cli_main
from sparse_transformer.distributed import redaction
from sparse_transformer.distributed import submit as sub

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def python_first_path(shim: Path) -> str:
    """``PATH`` with ``python`` the suite's interpreter, as when the venv is activated.

    Only ``python``: a folder holding a one-line script that runs this interpreter,
    not the venv's whole ``bin``, whose ``ninja`` (1.13) would shadow the one the rest
    of the suite finds on ``PATH``. The two hash their build commands differently, so
    each switch rebuilds DeepSpeed's cached CPU op (TORCH_EXTENSIONS_DIR) for a minute:
    once in this job's workers, once more in the next test that starts DeepSpeed.
    """
    shim.mkdir(parents=True, exist_ok=True)
    python = shim / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"


# `ray start --head` options, one free loopback port each
RAY_PORTS = (
    "port",  # GCS
    "dashboard-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


class RayHead:
    """A single-node Ray cluster on loopback (the job tests share one: conftest.py)."""

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None) -> None:
        # A short path: Ray's unix sockets live under the temp dir (108-byte limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.num_cpus = num_cpus
        self._pick_ports()
        self.env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(k, None)
        self.env.update(
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep Ray on loopback
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_metrics_report_interval_ms="1000",
        )
        self.env.update(env or {})

    def _pick_ports(self) -> None:
        self._ports = dict(zip(RAY_PORTS, free_ports(len(RAY_PORTS))))
        # Worker ports below Linux's ephemeral range (outgoing connections cannot take them)
        # and away from Ray's default 10002-19999 used by other tests' clusters.
        lo = random.randrange(20000, 31000)
        self.worker_ports = (lo, lo + 200)

    @property
    def gcs_port(self) -> int:
        return self._ports["port"]

    @property
    def dashboard_port(self) -> int:
        return self._ports["dashboard-port"]

    @property
    def metrics_port(self) -> int:
        return self._ports["metrics-export-port"]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def token(self) -> str:
        return self.token_path.read_text()

    def start(self, attempts: int = 3) -> None:
        """Start the head and wait for its job server and metrics endpoint. The ports were
        free when picked but are bound only now: on a failed start, retry with new ones."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except RuntimeError:
                if attempt + 1 == attempts:
                    self.stop()
                    raise
                self._pick_ports()

    def _start_once(self) -> None:
        lo, hi = self.worker_ports
        cmd = [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            *(f"--{flag}={port}" for flag, port in self._ports.items()),
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            self._kill()
            raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the job server answers (with the token)
            try:
                req = urllib.request.Request(
                    f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        else:
            self._kill()
            raise RuntimeError("the Ray job server did not come up")
        # The Prometheus exporter lives in the dashboard agent, which starts after the job
        # server; Ray's own series appear after its first report.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                    body = r.read().decode("utf-8", "replace")
                if body.startswith("ray_") or "\nray_" in body:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self._kill()
        raise RuntimeError(f"the Ray metrics endpoint {self.metrics_url} did not come up")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir or GCS port, and descendants."""
        marks = (str(self.temp_dir), f"127.0.0.1:{self.gcs_port}")
        roots: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if any(m in cmdline for m in marks) and p.pid != os.getpid():
                roots[p.pid] = p
        found = dict(roots)
        for p in roots.values():
            with contextlib.suppress(psutil.Error):
                for c in p.children(recursive=True):
                    found[c.pid] = c
        return list(found.values())

    def stop(self) -> None:
        """End this cluster's processes by id (SIGTERM, then SIGKILL) and remove its files."""
        self._kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill(self) -> None:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


@contextlib.contextmanager
def ray_head(**kw: object) -> Iterator[RayHead]:
    head = RayHead(**kw)  # type: ignore[arg-type]
    head.start()
    try:
        yield head
    finally:
        head.stop()


def reset_ray_token_cache() -> None:
    """Forget the token Ray's process-wide loader cached from this test's environment."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(autouse=True)
def _fresh_token_cache() -> Iterator[None]:
    # Later tests in this process (ray.init) must not see a token of a stopped test cluster.
    yield
    reset_ray_token_cache()


@pytest.fixture
def head(shared_ray_head: RayHead) -> RayHead:
    """The session's head (conftest.py): these tests run first on it, before any job."""
    return shared_ray_head


@pytest.fixture
def client_env(head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayHead:
    """This process as a client of ``head``: the token in Ray's usual file variable."""
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return head


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the ``sparse-transformer`` CLI in-process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
            if not isinstance(e.code, int) and e.code is not None:
                err.write(str(e.code))
    return code, out.getvalue(), err.getvalue()


def wait_status(head: RayHead, job_id: str, want: set[str], timeout: float = 120) -> str:
    c = sub.client(head.address)
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id).value
        if status in want:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{job_id} is {status}, not one of {want} after {timeout}s")


# ------------------------------------------------------------- security


def test_cluster_binds_loopback_only(head: RayHead) -> None:
    """Dashboard/job server, metrics and every other port of the head listen on 127.0.0.1."""
    pids = {p.pid for p in head.processes()}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    ports = {c.laddr.port for c in listening}
    assert head.dashboard_port in ports and head.metrics_port in ports and head.gcs_port in ports
    for c in listening:
        ip = ipaddress.ip_address(c.laddr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1
        assert ip.is_loopback, c


def test_job_server_requires_the_token(head: RayHead) -> None:
    url = f"{head.address}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    bad = urllib.request.Request(url, headers={"Authorization": "Bearer not-the-token"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 403


def test_client_reads_the_token_from_rays_places(
    client_env: RayHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = client_env
    assert sub.auth_token() == head.token  # RAY_AUTH_TOKEN_PATH
    code, out, err = run_cli("jobs", "list", "--address", head.address)
    assert code == 0, err
    assert out.startswith("JOB ID")
    assert head.token not in out + err
    # RAY_AUTH_TOKEN beats the file; a wrong token is rejected by the cluster.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert sub.auth_token() == "0" * 64
    with pytest.raises(Exception, match="403|Forbidden|[Ii]nvalid"):
        sub.client(head.address).list_jobs()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    # a token file that is not there is a clear error, not a traceback
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.temp_dir / "missing"))
    code, out, err = run_cli("jobs", "list", "--address", head.address)
    assert code != 0 and "RAY_AUTH_TOKEN_PATH" in err and not out
    # ~/.ray/auth_token when nothing else is set.
    home = head.temp_dir / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head.token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(home))
    assert sub.auth_token() == head.token
    assert sub.client(head.address).list_jobs() is not None


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert sub.resolve_address(None) == "http://127.0.0.1:8265"  # loopback by default
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the job server
    assert sub.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert sub.resolve_address(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com")
    assert sub.resolve_address(None) == "https://ray.example.com"
    assert sub.resolve_address("http://127.0.0.1:9000") == "http://127.0.0.1:9000"


def test_an_oversized_upload_is_refused_before_contacting_the_cluster() -> None:
    with pytest.raises(SystemExit, match="max-upload-mib"):
        sub.submit_job(["true"], address="http://127.0.0.1:9", max_upload_mib=0.01)


def test_credential_overrides_are_refused(client_env: RayHead) -> None:
    code, out, err = run_cli(
        "submit", "--address", client_env.address, "data.storage_options.secret=hunter2hunter2"
    )
    assert code != 0
    assert "credential-like" in err and "hunter2" not in out + err
    assert not [j for j in sub.client(client_env.address).list_jobs() if "hunter2" in j.entrypoint]


def test_redaction() -> None:
    cfg = {
        "data": {
            "url": "s3://bucket/enwik8",
            "storage_options": {
                "key": "AKIAIOSFODNN7EXAMPLE",
                "secret": "wJalrXUtnFEMI/K7MDENG",
                "client_kwargs": {"endpoint_url": "https://minio:9000"},
            },
        },
        "env_vars": {
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
            "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEXAMPLE",
            "HF_TOKEN": "hf_abcdefghijkl",
            "PYTHONUNBUFFERED": "1",
        },
        "checkpoint": "https://user:p4ssw0rd@storage.example.com/ckpt",
        "train": {"lr": 3e-4, "max_steps": 20},
        "list": ["password=abc123xyz", "plain"],
    }
    r = sub.redact(cfg)
    text = json.dumps(r)
    for secret in ("wJalrXUtnFEMI", "FQoGZXIvYXdz", "hf_abcdefghijkl", "p4ssw0rd", "abc123xyz"):
        assert secret not in text
    assert r["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert r["data"]["storage_options"]["secret"] == "***"
    # what is not a credential survives
    assert r["data"]["url"] == "s3://bucket/enwik8"
    assert r["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert r["train"] == {"lr": 3e-4, "max_steps": 20}
    assert r["checkpoint"].startswith("https://")
    assert r["checkpoint"].endswith("***@storage.example.com/ckpt")
    assert r["list"] == ["password=***", "plain"]
    assert cfg["data"]["storage_options"]["secret"] == "wJalrXUtnFEMI/K7MDENG"  # a copy
    line = "train.lr=3e-4 aws_secret_access_key=AbC123 --token xyz 'api_key': 'k-123456'"
    masked = redaction.redact_text(line)
    assert "AbC123" not in masked and "k-123456" not in masked and "train.lr=3e-4" in masked


def test_submit_prints_a_redacted_runtime_env(
    client_env: RayHead, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A forwarded credential reaches the job but no output; the config's runtime_env is used."""
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = tmp_path / "probe.yaml"  # a valid training config (submit checks it) + runtime_env
    cfg.write_text(
        (sub.PROJECT_ROOT / "configs" / "tiny.yaml").read_text()
        + "runtime_env:\n  env_vars:\n    PROBE_VALUE: from-config\n"
        "    STORAGE_PASSWORD: pw-in-config-123\n"
    )
    code, out, err = run_cli(
        "submit",
        "--address",
        client_env.address,
        "--config",
        str(cfg),
        "--env",
        "AWS_SECRET_ACCESS_KEY",
        "--job-id",
        "probe-" + secrets.token_hex(4),
        "--python",
        "/bin/echo",  # a harmless job: echoes the training command it was given
    )
    assert code == 0, err
    assert secret not in out + err and "pw-in-config-123" not in out + err
    assert "PROBE_VALUE" in err and "from-config" in err
    assert "'AWS_SECRET_ACCESS_KEY': '***'" in err
    job_id = re.search(r"submitted job (\S+)", out)[1]
    info = sub.client(client_env.address).get_job_info(job_id)
    assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret  # it did travel
    assert "--config probe.yaml" in info.entrypoint
    wait_status(client_env, job_id, {"SUCCEEDED"})
    code, logs, _ = run_cli("jobs", "logs", job_id, "--address", client_env.address)
    assert code == 0 and "-m sparse_transformer train --config probe.yaml" in logs
    assert secret not in logs


# --------------------------------------------------------------- jobs


def test_a_job_runs_the_project_snapshot_and_follow_reports_success(client_env: RayHead) -> None:
    """The driver and a Ray task import sparse_transformer from the uploaded snapshot."""
    probe = (
        "import os, ray, sparse_transformer as st; "
        "print('driver', st.__file__); ray.init(); "
        "f = ray.remote(lambda: __import__('sparse_transformer').__file__); "
        "print('task', ray.get(f.remote())); print('cwd', os.getcwd())"
    )
    _, job_id, _, _ = sub.submit_job([sys.executable, "-c", probe], address=client_env.address)
    code, out, err = run_cli("jobs", "logs", "--follow", job_id, "--address", client_env.address)
    assert code == 0, out + err
    assert f"job {job_id} SUCCEEDED" in out
    m_driver = re.search(r"^driver (\S+)", out, re.M)
    m_task = re.search(r"^task (\S+)", out, re.M)
    cwd = re.search(r"^cwd (\S+)", out, re.M)[1]
    assert m_driver and m_task, out
    for m in (m_driver, m_task):
        assert m[1] == f"{cwd}/sparse_transformer/__init__.py"  # the snapshot, not /work/...
    snapshot = Path(cwd) / "sparse_transformer"
    assert (snapshot / "cli.py").is_file() and (snapshot / "distributed" / "submit.py").is_file()
    for excluded in (".venv", ".git", ".whl", "runs", "data_cache"):
        assert not (snapshot / excluded).exists(), excluded
    code, out, _ = run_cli("jobs", "status", job_id, "--address", client_env.address)
    assert code == 0 and f"{job_id} SUCCEEDED" in out
    code, out, _ = run_cli("jobs", "list", "--address", client_env.address)
    assert code == 0 and job_id in out and "SUCCEEDED" in out


def test_follow_exits_non_zero_when_the_job_fails(client_env: RayHead) -> None:
    _, job_id, _, _ = sub.submit_job(
        [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"],
        address=client_env.address,
    )
    code, out, _ = run_cli("jobs", "logs", "--follow", job_id, "--address", client_env.address)
    assert code == 1
    assert "about to fail" in out and f"job {job_id} FAILED" in out


@pytest.mark.parametrize("action", ["status", "logs", "stop"])
def test_an_unknown_job_is_one_line_not_a_traceback(client_env: RayHead, action: str) -> None:
    code, out, err = run_cli("jobs", action, "no-such-job", "--address", client_env.address)
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"sparse-transformer jobs {action}: Request failed with status code 404: "
        "Job no-such-job does not exist."
    ]


def test_jobs_stop_stops_a_running_job(client_env: RayHead) -> None:
    marker = client_env.temp_dir / f"stopped-{secrets.token_hex(4)}"
    script = (
        "import time, pathlib; print('sleeping', flush=True); time.sleep(300); "
        f"pathlib.Path({str(marker)!r}).write_text('not stopped')"
    )
    _, job_id, _, _ = sub.submit_job([sys.executable, "-c", script], address=client_env.address)
    wait_status(client_env, job_id, {"RUNNING"})
    code, out, err = run_cli("jobs", "stop", job_id, "--address", client_env.address)
    assert code == 0, err
    assert f"{job_id} STOPPED" in out
    assert sub.client(client_env.address).get_job_status(job_id).value == "STOPPED"
    assert not marker.exists()
    # stopping it again is harmless
    code, out, _ = run_cli("jobs", "stop", job_id, "--address", client_env.address)
    assert code == 0 and "was not running" in out


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Checkpoints are never unpickled with arbitrary code: each torch.load says weights_only."""
    import ast

    calls = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "build", "tests") or "site-packages" in rel.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                kw = {k.arg: k.value for k in node.keywords}
                ok = (
                    isinstance(kw.get("weights_only"), ast.Constant)
                    and kw["weights_only"].value is True
                )
                calls.append((f"{rel}:{node.lineno}", ok))
    assert calls, "no torch.load found: the scan is broken"
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]
