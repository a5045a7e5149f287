"""Data-parallel scaling benchmark (issue 18): Ray Train + DeepSpeed on 1, 2 and 4 GPUs.

Every run goes through the project's own trainer (``run_training``) and its figures are
read from the run's metrics history (``metrics.jsonl``, as ``train_gpu.py`` does):

- **weak scaling**: tokens/s of each config (``enwik8``; ``cifar10`` optionally) on N
  workers at the same per-GPU batch, for each ZeRO stage of ``--zero``, fp16 with dynamic
  loss scaling and recomputation as the configs set; scaling efficiency =
  tokens/s(N) / (N x tokens/s(1)), the mean of every log window after the first (which
  holds the compile);
- **loss-curve match**: the largest-N run against a 1-worker run at the same global batch
  (same seed; the streaming order does not depend on the world size), both without
  dropout (each rank draws its own dropout masks): the largest absolute difference of the
  logged training loss;
- **recovery** (``--recovery``): on the largest N, one worker killed mid-run (Ray Train
  restarts the group from the last checkpoint), then rank 0 killed with no restart left,
  and the run relaunched on half the workers (at ZeRO stage ``--relaunch-zero`` where
  given; on one worker only then), which resumes through DeepSpeed's universal
  checkpoint; the steps each start resumed from;
- **peak memory** per GPU by ZeRO stage of ``music-65k`` (``--memory``; rank 0's peak).

Results are merged into ``--json`` (default ``benchmarks/results/scaling.json``) by run,
so the plan can be measured in several commands; each row records the ``train`` command
it ran. ``--budget-s`` skips runs that would not fit (estimated from earlier runs of the
same config). ``--cpu-smoke`` runs the whole plan small on the CPU (the tiny config, 2 CPU
workers, gloo, fp32, N in {1, 2}, ZeRO 1 and 2, loss match and recovery included)::

    python -m sparse_transformer.benchmarks.scaling --cpu-smoke
    python -m sparse_transformer.benchmarks.scaling --configs enwik8 --zero 1,2,3 \\
        --workers 1,2,4 --recovery --memory --budget-s 540

See docs/scaling.md for the commands of a 4-GPU session.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparse_transformer.distributed.hooks import RunInfo, TrainHooks

#: Per-GPU batch of each config (the one-GPU benchmarks' batches; tiny: the smoke run).
BATCH = {"enwik8": 4, "cifar10": 16, "music-65k": 1, "tiny": 2}
#: Rank 0's record of every (re)start of its loop, in the run's local folder.
STARTS_FILE = "scaling-starts.jsonl"
#: The smoke run's changes to the tiny config: short samples, no dropout, one thread.
SMOKE_OVERRIDES = [
    "data.seq_len=128",
    "train.torch_threads=1",
    "train.eval_batches=1",
    "run.num_cpus=2",
]

_last_step: dict[str, int] = {}


def log(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class StartProbe(TrainHooks):
    """Rank 0 appends ``{"step", "world_size"}`` to the run's ``scaling-starts.jsonl``
    whenever its loop starts or restarts: step 0 for a fresh run, else the checkpoint step
    it resumed from (a step that does not follow the one before in this process)."""

    def before_step(self, run: RunInfo, step: int) -> None:
        key = str(run.local_dir)
        if run.rank == 0 and _last_step.get(key) != step - 1:
            run.local_dir.mkdir(parents=True, exist_ok=True)
            line = {"step": step, "world_size": run.world_size, "pid": os.getpid()}
            with open(run.local_dir / STARTS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")
        _last_step[key] = step


@dataclass(frozen=True)
class Spec:
    """One run of the plan. ``kind``: ``scaling`` (a weak-scaling row), ``loss-ref`` (the
    1-worker run at the largest N's global batch), ``loss-n`` (the largest N without
    dropout, when the scaling rows have dropout), ``recovery``."""

    kind: str
    config: str
    zero: int
    workers: int
    global_batch: int
    dropout: float | None = None  # None: the config's
    relaunch_zero: int | None = None  # recovery: the relaunch's ZeRO stage (None: ``zero``)

    @property
    def key(self) -> str:
        key = f"{self.kind}/{self.config}/z{self.zero}/n{self.workers}/b{self.global_batch}"
        return key if self.relaunch_zero is None else f"{key}/rz{self.relaunch_zero}"

    @property
    def relaunch_workers(self) -> int:
        """Recovery: the relaunch's group, half this one (one worker: one)."""
        return max(1, self.workers // 2)

    @property
    def relaunch_stage(self) -> int:
        """Recovery: the relaunch's ZeRO stage."""
        return self.zero if self.relaunch_zero is None else self.relaunch_zero


@dataclass
class Settings:
    """What every run of one command shares."""

    work: Path
    steps: int
    log_every: int
    recovery_steps: int
    backend: str = "auto"
    use_gpu: bool = True
    urls: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    verbose: bool = False


# -- the plan -------------------------------------------------------------------------------


def measured_as_planned(row: dict[str, Any], spec: Spec, s: Settings) -> bool:
    """Was ``row`` (a run of ``spec``'s key) measured with the steps and dropout this
    command would run ``spec`` with? (The key names neither.) As ``run_spec`` records them."""
    from sparse_transformer.distributed.config import load_config

    cfg = load_config(spec.config, overrides(spec, s))
    return row.get("steps") == cfg.train.steps and row.get("dropout") == cfg.model.dropout


def config_dropout(name: str, dropout: float | None) -> float:
    from sparse_transformer.model import load_model_config

    return load_model_config(name).dropout if dropout is None else dropout


def plan(
    configs: list[str],
    zeros: list[int],
    workers: list[int],
    *,
    dropout: float | None = None,
    recovery: bool = False,
    loss_match: bool = True,
    memory_config: str | None = None,
    batch: dict[str, int] = BATCH,
    relaunch_zero: int | None = None,
) -> list[Spec]:
    """The runs, headline first: per config its first ZeRO stage on every N, the loss
    match, the other stages; then recovery on the first config (on one worker only when
    the relaunch changes the ZeRO stage: nothing else there needs the universal
    checkpoint); then the memory runs (largest N, every stage). A run already in the plan
    is not repeated."""
    nmax, z0, specs = max(workers), zeros[0], []
    for name in configs:
        b = batch[name]
        for z in zeros:
            specs += [Spec("scaling", name, z, n, n * b, dropout) for n in workers]
            if loss_match and z == z0 and nmax > 1:
                if config_dropout(name, dropout):
                    specs.append(Spec("loss-n", name, z, nmax, nmax * b, 0.0))
                specs.append(Spec("loss-ref", name, z, 1, nmax * b, 0.0))
    rz = None if relaunch_zero in (None, z0) else relaunch_zero
    if recovery and (nmax > 1 or rz is not None):
        b = batch[configs[0]]
        specs.append(Spec("recovery", configs[0], z0, nmax, nmax * b, dropout, rz))
    if memory_config:
        b = batch[memory_config]
        specs += [Spec("scaling", memory_config, z, nmax, nmax * b, dropout) for z in zeros]
    seen: set[str] = set()
    return [s for s in specs if not (s.key in seen or seen.add(s.key))]


def overrides(spec: Spec, s: Settings) -> list[str]:
    """The ``key=value`` overrides of one run (``train_gpu.bench_overrides`` plus the
    workers, the run's name and what the command adds)."""
    from sparse_transformer.benchmarks.train_gpu import bench_overrides

    steps = s.recovery_steps if spec.kind == "recovery" else s.steps
    out = bench_overrides(
        spec.config,
        steps,
        spec.global_batch,
        s.urls[spec.config],
        s.work / "runs",
        s.backend,
        precision="fp16" if s.use_gpu else "fp32",
        use_gpu=s.use_gpu,
        zero_stage=spec.zero,
    )
    out += [
        f"train.log_every={min(s.log_every, steps)}",
        f"scaling.num_workers={spec.workers}",
        f"run.name=scaling-{spec.key.replace('/', '-')}",
        "run.dashboard=false",
        *s.extra,
    ]
    if spec.dropout is not None:
        out.append(f"model.dropout={spec.dropout}")
    if spec.kind == "recovery":
        out += [f"train.checkpoint_every={max(1, steps // 4)}", "run.max_failures=1"]
    return collapse(out)


def collapse(ovr: list[str]) -> list[str]:
    """Each key once, at its first place, with its last value (what ``load_config`` does
    with repeated keys), so the recorded commands read plainly."""
    last = {o.split("=", 1)[0]: o for o in ovr}
    return [last.pop(k) for k in (o.split("=", 1)[0] for o in ovr) if k in last]


def command(name: str, ovr: list[str]) -> str:
    return shlex.join(["sparse-transformer", "train", "--config", name, *ovr])


# -- running ----------------------------------------------------------------------------------


def fit(name: str, ovr: list[str], s: Settings, hooks: list[TrainHooks]) -> dict[str, Any]:
    """One ``run_training`` of config ``name``; wall time, the final metrics or the error."""
    # by its module's name, not __main__'s, so that the workers unpickle it by reference
    from sparse_transformer.benchmarks.scaling import StartProbe
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import run_training

    cfg = load_config(name, ovr)
    start = time.time()
    out: dict[str, Any] = {"command": command(name, ovr)}
    if hooks:
        out["hooks"] = [repr(h) for h in hooks]
    try:
        summary = run_training(cfg, verbose=s.verbose, hooks=[StartProbe(), *hooks])
        out["final_step"] = summary.metrics.get("step")
    except Exception as err:  # a fault with no restart left: what the relaunch is for
        out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    out["wall_s"] = round(time.time() - start, 1)
    return out


def history_figures(cfg: Any) -> dict[str, Any]:
    """Tokens/s (the mean of every log window after the first), peak memory, the loss
    curve and the loss scale from the run's metrics history."""
    from sparse_transformer.benchmarks.train_gpu import read_history

    history = read_history(cfg)
    train = [m for m in history if "loss_bits" in m]
    tps = [m["tokens_per_second"] for m in train[1:]] or [train[0]["tokens_per_second"]]
    val = [m["val_loss_bits"] for m in history if "val_loss_bits" in m]
    return {
        "tokens_per_second": round(sum(tps) / len(tps), 1),
        "tokens_per_second_windows": [round(t, 1) for t in tps],
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in train),
        "loss_curve": [[m["step"], m["loss_bits"]] for m in train],
        "loss_scale_last": train[-1]["loss_scale"],
        "skipped_steps": train[-1]["skipped_steps"],
        "val_loss_bits": val[-1] if val else None,
    }


def starts(cfg: Any) -> list[dict[str, int]]:
    from sparse_transformer.distributed.trainer import local_state_dir

    path = local_state_dir(cfg) / STARTS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(x).items() if k != "pid"} for x in lines]


def run_spec(spec: Spec, s: Settings, keep: bool = False) -> dict[str, Any]:
    """Train one planned run (recovery: two fits) and return its row."""
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import local_state_dir

    ovr = overrides(spec, s)
    cfg = load_config(spec.config, ovr)
    shutil.rmtree(local_state_dir(cfg), ignore_errors=True)  # a fresh run, never a resume
    row: dict[str, Any] = {**asdict(spec), "key": spec.key, "steps": cfg.train.steps}
    row.update(batch_per_worker=spec.global_batch // spec.workers, seq_len=cfg.seq_len)
    row["dropout"] = cfg.model.dropout
    if spec.kind == "recovery":
        row.update(recover(spec, ovr, s))
    else:
        row.update(fit(spec.config, ovr, s, []))
    try:
        row.update(history_figures(cfg))
    except (OSError, ValueError, KeyError, IndexError) as err:
        row.setdefault("error", f"no metrics history: {err}")
    if not keep:
        shutil.rmtree(local_state_dir(cfg), ignore_errors=True)
    return row


def recover(spec: Spec, ovr: list[str], s: Settings) -> dict[str, Any]:
    """Rank N-1 killed (Ray Train restarts the group from the last checkpoint), later
    rank 0 killed with no restart left; the same run relaunched on N/2 workers (one
    worker: on one), at ``spec.relaunch_zero`` when set, resumes through DeepSpeed's
    universal checkpoint (where the world size or the stage changed) and runs to the end."""
    from sparse_transformer.benchmarks.faults import MARKER, KillAt
    from sparse_transformer.distributed.config import load_config

    every = max(1, s.recovery_steps // 4)
    kills = [
        KillAt(every + max(1, every // 2), rank=spec.workers - 1),
        KillAt(2 * every + max(1, every // 2), rank=0, marker=MARKER + "-2"),
    ]
    first = fit(spec.config, ovr, s, list(kills))
    cfg = load_config(spec.config, ovr)
    before = starts(cfg)
    fewer, rz = spec.relaunch_workers, spec.relaunch_stage
    relaunch = [f"scaling.num_workers={fewer}", f"train.zero_stage={rz}"]
    again = fit(spec.config, collapse([*ovr, *relaunch]), s, [])
    out = recovery_outcome(spec, before, starts(cfg)[len(before) :])
    problems = [again["error"]] if "error" in again else []
    if "error" not in first:
        problems.append("the first fit ran to its end: the second kill did not end it")
    if not (out["restarted_by_ray"] and out["relaunched"]):
        problems.append(f"expected a restart on {spec.workers} and on {fewer}: {out['starts']}")
    return {
        "checkpoint_every": every,
        "kills": [[k.step, k.rank] for k in kills],
        "relaunch_workers": fewer,
        "relaunch_zero": rz,
        **out,
        "command": first["command"],
        "relaunch_command": again["command"],
        "first_fit": first,
        "relaunch": again,
        "final_step": again.get("final_step"),
        "wall_s": round(first["wall_s"] + again["wall_s"], 1),
        **({"error": "; ".join(problems)} if problems else {}),
    }


def recovery_outcome(
    spec: Spec, first: list[dict[str, int]], again: list[dict[str, int]]
) -> dict[str, Any]:
    """What the starts logged by the killed fit (``first``) and by the relaunch (``again``)
    show: a restart by Ray Train (a resumed start of the first fit, on ``spec.workers``), a
    relaunch that resumed (on ``spec.relaunch_workers``), and whether that relaunch went
    through the universal checkpoint (the trainer's own rule, ``needs_universal``, applied
    to the two groups; not read from the worker's log)."""
    from sparse_transformer.distributed.checkpoint import needs_universal

    seen = [*first, *again]
    fewer = spec.relaunch_workers
    relaunched = any(x["step"] > 0 and x["world_size"] == fewer for x in again)
    saved = {"world_size": spec.workers, "zero_stage": spec.zero}
    return {
        "starts": seen,
        "resumed_from": [x["step"] for x in seen if x["step"] > 0],
        "restarted_by_ray": any(x["step"] > 0 and x["world_size"] == spec.workers for x in first),
        "relaunched": relaunched,
        "universal": relaunched and needs_universal(saved, fewer, spec.relaunch_stage),
    }


# -- summaries --------------------------------------------------------------------------------


def _ok(row: dict[str, Any]) -> bool:
    return "error" not in row and "tokens_per_second" in row


def efficiency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokens/s(N) / (N x tokens/s(1)) of every scaling row with a 1-worker row of the
    same config, ZeRO stage, per-GPU batch and steps."""
    scaling = [r for r in rows if r["kind"] == "scaling" and _ok(r)]

    def group(r: dict[str, Any]) -> tuple:
        return (r["config"], r["zero"], r["batch_per_worker"], r["steps"])

    base = {group(r): r for r in scaling if r["workers"] == 1}
    out = []
    for r in scaling:
        if (b := base.get(group(r))) is not None:
            eff = r["tokens_per_second"] / (r["workers"] * b["tokens_per_second"])
            out.append({"config": r["config"], "zero": r["zero"], "workers": r["workers"],
                        "tokens_per_second": r["tokens_per_second"],
                        "efficiency": round(eff, 4)})  # fmt: skip
    return out


def loss_match(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each 1-worker reference against the N-worker run of its global batch (``loss-n``,
    or a ``scaling`` row without dropout): the largest |difference| of the logged loss."""
    out = []
    for ref in (r for r in rows if r["kind"] == "loss-ref" and _ok(r)):
        same = [
            r for r in rows
            if _ok(r) and r["workers"] > 1 and r["dropout"] == 0 and r["steps"] == ref["steps"]
            and r["kind"] in ("loss-n", "scaling")
            and (r["config"], r["zero"], r["global_batch"])
            == (ref["config"], ref["zero"], ref["global_batch"])
        ]  # fmt: skip
        if not same:
            continue
        n = max(same, key=lambda r: r["kind"] == "loss-n")
        a, b = dict(map(tuple, n["loss_curve"])), dict(map(tuple, ref["loss_curve"]))
        common = sorted(set(a) & set(b))
        out.append({
            "config": ref["config"], "zero": ref["zero"], "workers": n["workers"],
            "global_batch": ref["global_batch"], "steps_compared": common,
            "max_abs_diff_bits": max(abs(a[k] - b[k]) for k in common) if common else None,
        })  # fmt: skip
    return out


def summarize(rows: list[dict[str, Any]], memory_config: str | None) -> dict[str, Any]:
    """Everything derived from the rows (so merged commands agree)."""
    widest: dict[tuple, dict[str, Any]] = {}  # per ZeRO stage, the run on the most GPUs
    for r in rows:
        if r["kind"] == "scaling" and r["config"] == memory_config and _ok(r):
            w = widest.setdefault((r["config"], r["zero"]), r)
            widest[r["config"], r["zero"]] = r if r["workers"] > w["workers"] else w
    kept = ("config", "zero", "workers", "batch_per_worker", "seq_len", "peak_memory_bytes")
    memory = [{k: r[k] for k in kept} for r in widest.values()]
    fields = ("config", "zero", "workers", "relaunch_workers", "relaunch_zero", "kills", "starts",
              "resumed_from", "restarted_by_ray", "universal", "final_step", "wall_s")  # fmt: skip
    recovery = [
        {k: r.get(k) for k in (*fields, "error") if k in r} for r in rows if r["kind"] == "recovery"
    ]
    return {
        "efficiency": efficiency(rows),
        "loss_match": loss_match(rows),
        "recovery": recovery,
        "memory": sorted(memory, key=lambda m: (m["config"], m["zero"], m["workers"])),
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables printed at the end."""
    eff = {(e["config"], e["zero"], e["workers"]): e["efficiency"] for e in result["efficiency"]}
    lines = [
        "| config | ZeRO | workers | batch/GPU x n | tokens/s | efficiency | peak memory | "
        "loss (bits) | wall s |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        if r["kind"] != "scaling":
            continue
        if not _ok(r):
            lines.append(f"| {r['config']} | {r['zero']} | {r['workers']} | | {r.get('error')} |")
            continue
        e = eff.get((r["config"], r["zero"], r["workers"]))
        curve = r["loss_curve"]
        lines.append(
            f"| {r['config']} | {r['zero']} | {r['workers']} | {r['batch_per_worker']} x "
            f"{r['seq_len']:,} | {r['tokens_per_second']:,.0f} | "
            f"{'' if e is None else f'{100 * e:.1f}%'} | "
            f"{r['peak_memory_bytes'] / 1e9:.2f} GB | {curve[0][1]:.3f} -> {curve[-1][1]:.3f} | "
            f"{r['wall_s']:.0f} |"
        )
    for m in result["loss_match"]:
        lines.append(
            f"\nloss match {m['config']} ZeRO {m['zero']}: {m['workers']} workers vs 1 at global "
            f"batch {m['global_batch']}: max |diff| {m['max_abs_diff_bits']:.2e} bits over "
            f"steps {m['steps_compared']}"
        )
    for r in result["recovery"]:
        lines.append(
            f"\nrecovery {r['config']} ZeRO {r['zero']} on {r['workers']}, relaunched on "
            f"{r['relaunch_workers']} at ZeRO {r.get('relaunch_zero', r['zero'])}: "
            f"kills (step, rank) {r['kills']}; starts "
            f"{[(x['step'], x['world_size']) for x in r['starts']]} (step, world size); "
            f"resumed from {r['resumed_from']}; universal {r['universal']}; "
            f"final step {r['final_step']}" + (f"; error {r['error']}" if "error" in r else "")
        )
    if memory := result["memory"]:
        by_stage = ", ".join(
            f"ZeRO {m['zero']} {m['peak_memory_bytes'] / 1e9:.2f} GB" for m in memory
        )
        lines.append(f"\npeak memory per GPU, {memory[0]['config']} on {memory[0]['workers']}: "
                     f"{by_stage}")  # fmt: skip
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------


def earlier(path: Path, fresh: bool) -> dict[str, Any]:
    """What earlier commands wrote to ``path`` (its rows and commands), unless ``fresh``."""
    return {} if fresh or not path.exists() else json.loads(path.read_text())


def metadata(
    before: dict[str, Any], command: str, use_gpu: bool, memory_config: str | None
) -> dict[str, Any]:
    """This command's record beside the earlier ones'; the memory table's config stays
    the earlier command's when this one measures no memory (the table is derived anew
    from the merged rows on every save)."""
    import torch

    return {
        "commands": [*before.get("commands", []), command],
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu (smoke run)",
        "gpus": torch.cuda.device_count() if use_gpu else 0,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "memory_config": memory_config or before.get("memory_config"),
    }


def save(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    result = {**meta, "rows": rows, **summarize(rows, meta.get("memory_config"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def estimate(spec: Spec, rows: list[dict[str, Any]]) -> float:
    """Seconds the run will take: the longest earlier run of its config, else twice the
    longest of any config (0 when none ran yet); a recovery run 2.5 times that (a
    restart and a relaunch)."""
    walls = [r["wall_s"] for r in rows if r["kind"] != "recovery" and "wall_s" in r]
    same = [r["wall_s"] for r in rows if r["config"] == spec.config and r["kind"] != "recovery"]
    longest = max(same, default=2 * max(walls, default=0.0))
    return 2.5 * longest if spec.kind == "recovery" else longest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--configs", default="enwik8", help="comma-separated (enwik8,cifar10)")
    p.add_argument("--zero", default="1,2,3", help="ZeRO stages, comma-separated")
    p.add_argument("--workers", default="1,2,4", help="worker counts N, comma-separated")
    p.add_argument("--steps", type=int, default=60, help="steps of each scaling run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=0, help="per-GPU batch (0: BATCH by config)")
    p.add_argument("--dropout", type=float, default=None, help="model.dropout (config's)")
    p.add_argument("--recovery", action="store_true", help="kill, restart, relaunch on N/2")
    p.add_argument("--recovery-steps", type=int, default=40)
    p.add_argument(
        "--relaunch-zero",
        type=int,
        default=None,
        help="the recovery relaunch's ZeRO stage (default: the first of --zero; another "
        "stage resumes through the universal checkpoint, so recovery runs on one GPU too)",
    )
    p.add_argument("--memory", action="store_true", help="peak memory by ZeRO stage")
    p.add_argument("--memory-config", default="music-65k")
    p.add_argument("--backend", default="auto", help="attention backend (auto: Triton)")
    p.add_argument("--data-url", action="append", default=[], help="CONFIG=URL (prepared)")
    p.add_argument("--work", default="", help="datasets, runs (runs/scaling[-smoke])")
    p.add_argument("--json", default=None, help="default benchmarks/results/scaling.json")
    p.add_argument(
        "--fresh", action="store_true", help="drop the JSON's rows (else runs in it are kept)"
    )
    p.add_argument("--no-loss-match", action="store_true", help="leave out the loss match")
    p.add_argument("--budget-s", type=float, default=0, help="skip runs past this (0: none)")
    p.add_argument("--keep-runs", action="store_true", help="keep run folders (checkpoints)")
    p.add_argument("--verbose", action="store_true", help="the trainer's progress lines")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="a fixed small plan: tiny, 1 and 2 CPU workers, fp32, recovery and memory "
        "(it sets --configs, --workers, --steps, --log-every, --recovery[-steps], "
        "--memory[-config] and --fresh)",
    )
    args = p.parse_args(argv)
    if not args.cpu_smoke:
        args.work = args.work or "runs/scaling"
    else:
        args.configs, args.memory_config, args.recovery, args.memory = "tiny", "tiny", True, True
        args.fresh, args.work = True, args.work or "runs/scaling-smoke"
        args.workers, args.steps, args.log_every, args.recovery_steps = "1,2", 6, 2, 8
        args.dropout = 0.0 if args.dropout is None else args.dropout
        if args.zero == "1,2,3":
            args.zero = "1,2"
    if args.relaunch_zero is not None:
        if not args.recovery:
            p.error("--relaunch-zero: the recovery relaunch's stage; add --recovery")
        if not 1 <= args.relaunch_zero <= 3 or args.zero.split(",")[0] == "0":
            p.error("--relaunch-zero: DeepSpeed repartitions optimizer state between ZeRO "
                    "stages 1-3 only (the relaunch's stage and the first of --zero)")  # fmt: skip
    return args


def settings(args: argparse.Namespace, configs: list[str]) -> Settings:
    """Where the data comes from (``--data-url`` or this repository's text, prepared at
    each config's context under ``--work``) and what every run shares."""
    from sparse_transformer.benchmarks.train_gpu import repo_text_dataset
    from sparse_transformer.distributed.config import load_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(work, args.steps, args.log_every, args.recovery_steps, backend=args.backend,
                 use_gpu=not args.cpu_smoke, verbose=args.verbose,
                 extra=list(SMOKE_OVERRIDES) if args.cpu_smoke else [])  # fmt: skip
    given = dict(u.split("=", 1) for u in args.data_url)
    if args.cpu_smoke and not (work / "corpus.txt").exists():
        smoke_corpus(work / "corpus.txt")
    for name in configs:
        seq_len = load_config(name, s.extra).seq_len
        s.urls[name] = given.get(name) or repo_text_dataset(work, seq_len)
    return s


def smoke_corpus(path: Path, limit: int = 1 << 20) -> None:
    """About 1 MB of this repository's Python sources (the smoke run's text)."""
    root, size = Path(__file__).resolve().parents[1], 0
    with open(path, "wb") as f:
        for p in sorted(root.rglob("*.py")):
            if ".venv" not in p.parts and size < limit:
                size += f.write(p.read_bytes())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("scaling: needs CUDA GPUs (or --cpu-smoke)", file=sys.stderr)
        return 2
    configs, zeros = args.configs.split(","), [int(z) for z in args.zero.split(",")]
    workers = sorted({int(n) for n in args.workers.split(",")})
    if not args.cpu_smoke and workers[-1] > torch.cuda.device_count():
        # Ray Train would wait for the missing GPUs without end
        print(f"scaling: --workers {args.workers} needs {workers[-1]} GPUs, this machine "
              f"has {torch.cuda.device_count()}", file=sys.stderr)  # fmt: skip
        return 2
    batch = {**BATCH, **({c: args.batch for c in configs} if args.batch else {})}
    memory_config = args.memory_config if args.memory else None
    specs = plan(configs, zeros, workers, dropout=args.dropout, recovery=args.recovery,
                 loss_match=not args.no_loss_match, memory_config=memory_config,
                 batch=batch, relaunch_zero=args.relaunch_zero)  # fmt: skip
    s = settings(args, sorted({sp.config for sp in specs}))
    default = s.work / "scaling.json" if args.cpu_smoke else Path("benchmarks/results/scaling.json")
    path = Path(args.json) if args.json else default
    before = earlier(path, args.fresh)
    args_given = sys.argv[1:] if argv is None else argv
    this = shlex.join(["python", "-m", "sparse_transformer.benchmarks.scaling", *args_given])
    meta = metadata(before, this, s.use_gpu, memory_config)
    result = run_plan(specs, s, list(before.get("rows", [])), path, meta, args)
    print(markdown(result))
    failed = [r["key"] for r in result["rows"] if r["key"] in result["ran"] and "error" in r]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def run_plan(
    specs: list[Spec],
    s: Settings,
    rows: list[dict[str, Any]],
    path: Path,
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every planned run within the budget, in one Ray instance (each ``run_training``
    joins it), the JSON rewritten after each run; the result."""
    import ray

    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import init_ray

    start, skipped, ran = time.time(), [], []
    done = {r["key"]: r for r in rows if "error" not in r}
    instance = init_ray(load_config(specs[0].config, overrides(specs[0], s)))
    try:
        for spec in specs:
            if spec.key in done and measured_as_planned(done[spec.key], spec, s):
                log(f"{spec.key}: measured before ({path}; --fresh measures again)")
                continue
            if spec.key in done:
                log(f"{spec.key}: measured before with other steps or dropout: measuring again")
            if args.budget_s and time.time() - start + estimate(spec, rows) > args.budget_s:
                log(f"{spec.key}: skipped (would not fit --budget-s {args.budget_s:g})")
                skipped.append(spec.key)
                continue
            log(f"{spec.key}: training")
            row = {**run_spec(spec, s, keep=args.keep_runs), "device": meta["device"]}
            ran.append(spec.key)
            log(f"{spec.key}: {row.get('tokens_per_second')} tokens/s, {row['wall_s']} s"
                + (f", {row['error']}" if "error" in row else ""))  # fmt: skip
            rows = [r for r in rows if r["key"] != spec.key] + [row]
            save(path, rows, {**meta, "skipped": skipped, "ran": ran})
    finally:
        if instance.started:
            ray.shutdown()
    log(f"wrote {path} ({time.time() - start:.0f} s)")
    return save(path, rows, {**meta, "skipped": skipped, "ran": ran})


if __name__ == "__main__":
    sys.exit(main())
