"""Evaluation and sampling, written once: the trainer's periodic validation and the
``eval`` / ``sample`` commands both use these.

The loss is summed on the device (nats x tokens, tokens) in fp64 and read once, so an
evaluation costs one host sync however many batches it has; the caller all-reduces the
sums across ranks when there are several.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sparse_transformer.model import generate, nats_to_bits


def next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """Targets of a (B, T) batch: position t predicts t + 1; the last position is ignored (-1)."""
    pad = torch.full_like(batch[:, :1], -1)
    return torch.cat([batch[:, 1:], pad], dim=1)


@torch.no_grad()
def loss_sums(
    forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """(sum over tokens of the loss in nats, tokens) over ``batches``, fp64 on ``device``.

    ``forward(idx, targets)`` returns ``(logits, mean loss in nats)``: the model or a
    DeepSpeed engine wrapping it.
    """
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        targets = next_token_targets(batch)
        _, loss = forward(batch, targets)
        n = (targets >= 0).sum().double()
        total += torch.stack([loss.double() * n, n])
    return total


def bits_per_token(sums: torch.Tensor | list[float]) -> float:
    """Bits per byte/dim of :func:`loss_sums`' result (NaN when it saw no token)."""
    nats, tokens = sums.tolist() if torch.is_tensor(sums) else sums
    return float(nats_to_bits(nats / tokens)) if tokens > 0 else float("nan")


def sample_text(
    module: torch.nn.Module,
    prompt: str,
    length: int,
    *,
    seed: int,
    device: torch.device,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> str:
    """Up to ``length`` bytes after ``prompt`` (a newline when empty), decoded as UTF-8."""
    start = prompt.encode("utf-8") or b"\n"
    length = min(length, module.config.n_ctx - len(start))
    idx = torch.tensor([list(start)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(module, idx, length, temperature=temperature, top_p=top_p, generator=gen)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


__all__ = ["bits_per_token", "loss_sums", "next_token_targets", "sample_text"]
