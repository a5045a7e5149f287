"""Collectives reach the backend on a device it takes (the NCCL/CPU-tensor bug of issue 10).

On one GPU every run died at the first logged step: the worker all-reduced CPU tensors
through an NCCL process group (``No backend type associated with device type cpu``).
CI has no GPU, so these tests stand in a backend that, like NCCL, takes CUDA tensors
only: a Python ``ProcessGroup`` registered for the ``cuda`` device type that records the
device of every tensor reaching it. Under ``FakeTensorMode`` tensors can live on a
(fake) CUDA device on a CPU-only build. The landed code called ``dist.all_reduce`` on CPU
tensors directly; ``test_no_module_calls_a_collective_directly`` and the fake-backend test
fail on it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparse_transformer.distributed import collectives

DISTRIBUTED = Path(collectives.__file__).parent
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
}


def _direct_collective_calls(path: Path) -> list[str]:
    """``dist.X(...)`` / ``torch.distributed.X(...)`` calls of a collective X in ``path``."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in aliases:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_module_calls_a_collective_directly() -> None:
    offenders = [
        call
        for path in sorted(DISTRIBUTED.glob("*.py"))
        if path.name != "collectives.py"
        for call in _direct_collective_calls(path)
    ]
    assert not offenders, "collectives must go through distributed/collectives.py:\n" + "\n".join(
        offenders
    )


def test_the_scan_finds_direct_calls(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import torch.distributed as dist\nimport torch\n"
        "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n"
    )
    assert [c.split(": ")[1] for c in _direct_collective_calls(src)] == [
        "dist.all_reduce",
        "torch.distributed.barrier",
    ]


class _DoneWork(dist.Work):
    def wait(self, timeout: object = None) -> bool:
        return True


class _CudaOnlyGroup(dist.ProcessGroup):
    """A one-rank backend that, like NCCL, refuses tensors of any device but CUDA."""

    seen: list[torch.device] = []

    def _take(self, tensors: list[torch.Tensor]) -> _DoneWork:
        for t in tensors:
            if t.device.type != "cuda":
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")
            self.seen.append(t.device)
        return _DoneWork()

    def allreduce(self, tensors: list[torch.Tensor], opts: object = None) -> _DoneWork:
        return self._take(tensors)

    def barrier(self, opts: dist.BarrierOptions) -> _DoneWork:
        self.seen.append(torch.device("cuda", opts.device_ids[0]))
        return _DoneWork()

    def getBackendName(self) -> str:  # noqa: N802 - ProcessGroup's name
        return "st_cuda_only"


@pytest.fixture
def cuda_only_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[_CudaOnlyGroup]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not hasattr(dist.Backend, "ST_CUDA_ONLY"):
        dist.Backend.register_backend(
            "st_cuda_only", lambda store, rank, size, timeout: _CudaOnlyGroup(rank, size),
            devices=["cuda"],
        )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # no CUDA on this build
    dist.init_process_group("st_cuda_only", store=FakeStore(), rank=0, world_size=1)
    _CudaOnlyGroup.seen = []
    try:
        yield _CudaOnlyGroup
    finally:
        dist.destroy_process_group()


def test_a_cuda_only_backend_gets_cuda_tensors(cuda_only_group: type[_CudaOnlyGroup]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert collectives.backend_device() == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.zeros(2, dtype=torch.float64))  # what the landed worker did
    with FakeTensorMode():
        window = torch.zeros(2, dtype=torch.float64)  # a metric on the CPU
        assert collectives.all_reduce(window) is window
        assert window.device == torch.device("cpu")  # the result lands where it was
        on_gpu = torch.zeros(2, device=torch.device("cuda", 0))
        collectives.all_reduce(on_gpu)
    collectives.barrier()
    assert cuda_only_group.seen == [torch.device("cuda", 0)] * 3


def test_gloo_reduces_cpu_tensors_in_place() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert collectives.backend_device() == torch.device("cpu")
        t = torch.tensor([1.5, 2.0], dtype=torch.float64)
        assert collectives.all_reduce(t) is t
        assert t.tolist() == [1.5, 2.0]  # one rank: the sum is itself
        collectives.all_reduce(t, op=dist.ReduceOp.MAX)
        collectives.barrier()
    finally:
        dist.destroy_process_group()
