"""Where the host's time goes in one forward+backward of the Triton attention op.

    python -m sparse_transformer.benchmarks.attention_host [--config cifar10] [--json PATH]

Microseconds per call until the last launch returns (the GPU is synchronised only
around each batch of calls), for one shape of ``benchmarks/attention.py``:

- each backward launch (the rowsum kernel, dQ, dK/dV) as the op launches it (the
  compiled kernel's own launcher), through Triton's autotuner and through its JIT;
- ``_fwd_impl`` and ``_bwd_impl`` called directly (Python and launches only);
- the op's forward+backward through ``torch.autograd.grad``: as it runs by default
  (the backward on autograd's device thread), with autograd's threads off (the
  backward on the calling thread), and the direct backward on another Python thread;
- a trivial ``autograd.grad`` (``q * 2``): the engine's own cost on this host, on
  autograd's device thread and on the calling thread;
- ``phases``: one autograd forward+backward cut at the kernels' Python entry points
  (median microseconds from the call to ``_fwd_impl``, inside it, back to the caller,
  from ``autograd.grad`` to ``_bwd_impl``, inside it, and back to the caller);
- ``profile_one_thread``: cProfile's costliest functions of the forward+backward with
  the backward on the calling thread (so the profiler sees it).

Comparing the rows tells the launch cost, the autotuner's, the autograd engine's and a
thread hand-off's apart. ``--cpu-smoke`` runs every row on the CPU under Triton's
interpreter at a tiny shape (the plumbing only: its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Host microseconds per ``fn()``, over ``calls`` calls after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (issued - start) / calls * 1e6


def _on_thread(fn: Callable[[], float]) -> float:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def _inputs(config: str, smoke: bool):
    from sparse_transformer.benchmarks.attention import CONFIGS
    from sparse_transformer.ops import compile_layout, pattern_for_layer

    kind, mode, heads, d, n, l, c, batch, blocks = CONFIGS[config]
    device, dtype = ("cuda", torch.float16) if not smoke else ("cpu", torch.float32)
    if smoke:  # the same pattern kind at a size the interpreter runs in seconds
        n, l, c, batch, d, blocks = 64, 16, 4 if c else 0, 1, 16, [(16, 16)]
    pattern = pattern_for_layer(kind, mode=mode, layer=0, n_heads=heads, stride=l, summary=c)
    layout = compile_layout(pattern, n, heads, *blocks[0], device=device)
    q, k, v, dout = (torch.randn(batch, heads, n, d, device=device, dtype=dtype) for _ in range(4))
    return layout, q, k, v, dout


def measure(config: str, calls: int, smoke: bool) -> dict[str, float]:
    """The rows of the module's docstring for one shape, in microseconds."""
    from sparse_transformer.ops import sparse_attention
    from sparse_transformer.ops import triton_attention as ta

    layout, q, k, v, dout = _inputs(config, smoke)
    scale = q.shape[-1] ** -0.5
    out, lse = ta._fwd_impl(q, k, v, layout, scale)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def fwd_bwd() -> None:
        o = sparse_attention(qg, kg, vg, layout, backend="triton")
        torch.autograd.grad(o, (qg, kg, vg), dout)

    def backward() -> object:
        return ta._bwd_impl(q, k, v, out, lse, dout, layout, scale)

    rows = {"launches": launch_costs(layout, q, k, v, out, lse, dout, scale, calls)}
    rows["fwd_impl"] = per_call_us(lambda: ta._fwd_impl(q, k, v, layout, scale), calls)
    rows["bwd_impl"] = per_call_us(backward, calls)
    rows["fwd_bwd_autograd"] = per_call_us(fwd_bwd, calls)
    with torch.autograd.set_multithreading_enabled(False):
        rows["fwd_bwd_autograd_one_thread"] = per_call_us(fwd_bwd, calls)
    rows["bwd_impl_other_thread"] = _on_thread(lambda: per_call_us(backward, calls))
    x = q.clone().requires_grad_()
    rows["trivial_autograd"] = per_call_us(lambda: torch.autograd.grad(x * 2, (x,), q), calls)
    with torch.autograd.set_multithreading_enabled(False):
        trivial = per_call_us(lambda: torch.autograd.grad(x * 2, (x,), q), calls)
    rows["trivial_autograd_one_thread"] = trivial
    rows["phases"] = phases(lambda: sparse_attention(qg, kg, vg, layout, backend="triton"),
                            (qg, kg, vg), dout, calls)  # fmt: skip
    with torch.autograd.set_multithreading_enabled(False):
        rows["profile_one_thread"] = top_functions(fwd_bwd, calls)
    return rows


@contextlib.contextmanager
def _stamped(stamps: dict[str, int]):
    """Record when the autograd.Function's forward and backward enter and leave the
    kernels' Python entry points (``_fwd_impl``, ``_bwd_impl``)."""
    from sparse_transformer.ops import triton_attention as ta

    fwd, bwd = ta._fwd_impl, ta._bwd_impl

    def stamp(name: str, fn):
        def wrapped(*args):
            stamps[name + "_in"] = time.perf_counter_ns()
            result = fn(*args)
            stamps[name + "_out"] = time.perf_counter_ns()
            return result

        return wrapped

    ta._fwd_impl, ta._bwd_impl = stamp("fwd", fwd), stamp("bwd", bwd)
    try:
        yield
    finally:
        ta._fwd_impl, ta._bwd_impl = fwd, bwd


PHASES = {
    "to_fwd_impl": ("call", "fwd_in"),
    "fwd_impl": ("fwd_in", "fwd_out"),
    "fwd_impl_to_caller": ("fwd_out", "forward_done"),
    "grad_to_bwd_impl": ("forward_done", "bwd_in"),
    "bwd_impl": ("bwd_in", "bwd_out"),
    "bwd_impl_to_caller": ("bwd_out", "grad_done"),
}


def phases(forward: Callable[[], torch.Tensor], inputs, dout, calls: int) -> dict:
    """Median microseconds of each of ``PHASES`` over ``calls`` forward+backwards, by
    default (backward on autograd's device thread) and with autograd's threads off."""
    out = {}
    for mode, threaded in (("device_thread", True), ("one_thread", False)):
        samples: dict[str, list[float]] = {name: [] for name in PHASES}
        stamps: dict[str, int] = {}
        with _stamped(stamps), torch.autograd.set_multithreading_enabled(threaded):
            for i in range(calls + 1):
                stamps["call"] = time.perf_counter_ns()
                o = forward()
                stamps["forward_done"] = time.perf_counter_ns()
                torch.autograd.grad(o, inputs, dout)
                stamps["grad_done"] = time.perf_counter_ns()
                for name, (a, b) in PHASES.items():
                    if i:  # the first call warms up
                        samples[name].append((stamps[b] - stamps[a]) / 1e3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out[mode] = {name: statistics.median(v) for name, v in samples.items()}
    return out


def top_functions(fn: Callable[[], object], calls: int, top: int = 25) -> list[str]:
    """cProfile's ``top`` functions by own time over ``calls`` calls of ``fn``."""
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def launch_costs(layout, q, k, v, out, lse, dout, scale, calls: int) -> dict[str, float]:
    """Each backward launch alone (the two-pass backward's), three ways: as the op
    launches it (``cache``: the compiled kernel's own launcher once Triton compiled it),
    through Triton's autotuner, and straight into Triton's JIT kernel."""
    from sparse_transformer.ops import triton_attention as ta

    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    delta = ta._new_row_stats(q)
    calls_by_name = {
        "delta": ta._delta_call(out, dout, delta),
        "dq": ta._dq_call(q, k, v, dout, dq, lse, delta, layout, scale),
        "dkdv": ta._dkdv_call(q, k, v, dout, dk, dv, dk, lse, delta, layout, scale, False),
    }
    rows = {}
    for name, call in calls_by_name.items():
        for via in ("cache", "autotuner", "jit"):
            if via != "autotuner" or ta._TUNED.get(call.kernel, call.kernel) is not call.kernel:
                rows[f"{name}_{via}"] = per_call_us(lambda c=call, w=via: c.run(w), calls)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10", help="a shape of benchmarks/attention.py")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--cpu-smoke", action="store_true", help="the plumbing, Triton interpreted")
    args = p.parse_args(argv)
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("attention_host: --cpu-smoke needs TRITON_INTERPRET=1 set", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("attention_host: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    rows = measure(args.config, 1 if args.cpu_smoke else args.calls, args.cpu_smoke)
    device = torch.cuda.get_device_name(0) if not args.cpu_smoke else "cpu (smoke run)"
    result = {"device": device, "torch": torch.__version__, "config": args.config, "us": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
