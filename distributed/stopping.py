"""Stopping a run cleanly on SIGINT or SIGTERM.

The driver (:func:`stop_on_signals`) turns the first SIGINT/SIGTERM into a request
held by a small Ray actor (:class:`StopFlag`); a second signal stops at once, the
default way. ``trainer.fit()`` runs beside it in a thread (:func:`fit_beside_signals`),
so Ray Train's own SIGINT handler, which aborts without a checkpoint, stays out.

Each worker (:class:`StopWatcher`) polls the flag from a thread, and the ranks agree at
a step boundary: one all-reduce of the local flags per step, read a step later so the
host never waits for the device. All ranks then stop after the same step, save a
checkpoint that Ray Train registers like any other, and return; the driver says where
the run can resume from and shuts its Ray instance down, leaving no Ray process behind.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import ray
import torch

NAMESPACE = "sparse_transformer"


@ray.remote(num_cpus=0)
class StopFlag:
    """Why the run should stop (None: it should not), set once by the driver."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def request(self, reason: str) -> None:
        self._reason = self._reason or reason

    def reason(self) -> str | None:
        return self._reason


@contextlib.contextmanager
def stop_on_signals(verbose: bool = True) -> Iterator[str | None]:
    """While the body runs (Ray must be initialised), the first SIGINT/SIGTERM asks the
    workers to stop at the next step boundary; a second one raises KeyboardInterrupt.
    Yields the flag actor's name for the workers; None (and no handlers) outside the
    main thread, where Python cannot take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    name = f"stop-{uuid.uuid4().hex[:12]}"
    flag = StopFlag.options(name=name, namespace=NAMESPACE).remote()
    requested = threading.Event()
    reasons: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        reasons.append(signal.Signals(signum).name)
        requested.set()
        if verbose:
            print(
                f"[train] {reasons[0]}: stopping at the next step boundary with a checkpoint "
                "(send it again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )

    def forward() -> None:  # Ray calls stay out of the signal handler
        requested.wait()
        if reasons:
            flag.request.remote(reasons[0])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=forward, daemon=True, name="stop-forwarder").start()
    try:
        yield name
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        requested.set()  # ends the forwarder
        with contextlib.suppress(Exception):
            ray.kill(flag)


def fit_beside_signals(trainer: Any) -> Any:
    """``trainer.fit()`` in a thread while this (main) thread waits and takes signals:
    Ray Train's own SIGINT handler, which aborts the workers without a checkpoint, is
    only installed when ``fit`` runs in the main thread."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True, name="trainer-fit")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class StopWatcher:
    """The worker side: :meth:`should_stop` is called by every rank once per step and
    returns the same answer on all of them, one step after a stop was requested."""

    def __init__(self, flag_name: str | None, world: int, device: torch.device) -> None:
        self.world = world
        self.reason: str | None = None
        self._local = threading.Event()
        # the per-step agreement reuses one device flag, one host copy and one event
        on_cuda = device.type == "cuda"
        self._flag = torch.zeros(1, device=device)
        self._host = torch.zeros(1, pin_memory=on_cuda)
        self._event = torch.cuda.Event() if on_cuda else None
        self._agreed_once = False
        if flag_name:
            flag = ray.get_actor(flag_name, namespace=NAMESPACE)
            threading.Thread(target=self._poll, args=(flag,), daemon=True).start()

    def _poll(self, flag: Any, every_s: float = 0.5) -> None:
        while not self._local.is_set():
            try:
                self.reason = ray.get(flag.reason.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the driver is gone: Ray Train ends us
                return
            if self.reason:
                self._local.set()
                return
            self._local.wait(every_s)

    def should_stop(self) -> bool:
        if self.world == 1:
            return self._local.is_set()
        from sparse_transformer.distributed import collectives

        decided = False
        if self._agreed_once:  # the previous step's agreement, long since done
            if self._event is not None:
                self._event.synchronize()
            decided = bool(self._host.item())
        self._flag.fill_(float(self._local.is_set()))
        collectives.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        self._host.copy_(self._flag, non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
        self._agreed_once = True
        if decided and self.reason is None:
            self.reason = "a stop request"  # another rank saw it first
        return decided


__all__ = ["NAMESPACE", "StopFlag", "StopWatcher", "fit_beside_signals", "stop_on_signals"]
