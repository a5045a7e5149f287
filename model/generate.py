"""Autoregressive sampling with temperature and nucleus (top-p) truncation.

:func:`generate` prefills a :class:`~sparse_transformer.model.kv_cache.KVCache`
from the prompt with one sparse forward pass, then decodes one position at a
time; each step reads only the keys the layer's pattern allows (see
``kv_cache``), so memory stays linear in n. The whole batch advances in
lockstep, so prompts share one length. The model predicts token t + 1 from
positions <= t and has no start token: the prompt holds at least one token
(for unconditional samples pass e.g. a first byte or pixel drawn from data).
"""

from __future__ import annotations

import torch

from sparse_transformer.model.transformer import SparseTransformer

_UNIT = 2.0**52  # fixed-point unit of the nucleus scan


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V) -> (B, 1).

    ``temperature`` 0 picks the argmax. ``top_p`` < 1 keeps the smallest set of
    most likely tokens whose probability reaches top_p (always at least one).
    """
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = sampling_probs(logits, temperature, top_p)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse a negative temperature or a nucleus mass outside (0, 1]."""
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The fp32 probabilities (B, V) that sampling draws from: softmax(logits / temperature)
    with the tokens outside the top_p nucleus set to 0 (not renormalised)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V) each
        # the mass of the more likely tokens, as an integer scan in units of 2**-52: exact,
        # and allowed under torch.use_deterministic_algorithms (CUDA's float cumsum is not)
        units = (sorted_p.double() * _UNIT).round().long()  # (B, V)
        before = units.cumsum(-1) - units
        sorted_p = sorted_p.masked_fill(before >= round(top_p * _UNIT), 0.0)  # outside
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, V)
    return probs


def sample_with_noise(
    logits: torch.Tensor, noise: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """:func:`sample_logits` with its randomness given: (B, V) logits -> (B, 1) tokens.

    ``torch.multinomial(probs, 1, generator)`` is ``argmax(probs / q)`` with
    ``q = torch.empty_like(probs).exponential_(1, generator=generator)`` (the exponential
    race; ATen's one-sample path), so ``noise`` drawn that way from the same generator
    gives the same tokens, with no host synchronisation (multinomial checks its input on
    the host) and no generator inside a compiled graph. ``noise`` is unused at
    temperature 0 (argmax).
    """
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return (sampling_probs(logits, temperature, top_p) / noise).argmax(-1, keepdim=True)


@torch.no_grad()
def generate(
    model: SparseTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | int | None = None,
    fast: bool | str = False,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after ``prompt`` (B, T0) -> (B, T0 + max_new_tokens).

    Runs the model in eval mode (no dropout) and restores its mode afterwards.
    ``generator``: a ``torch.Generator`` (on the model's device), an int seed, or
    None for the global RNG; the same seed gives the same samples.
    ``fast``: False decodes with :class:`KVCache` step by step (the reference); True or
    a mode of ``fast_decode.FAST_MODES`` uses a static cache and a compiled or captured
    step (True: ``compile-blocks`` on CUDA, ``static`` elsewhere), with the same tokens.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, T0) with T0 >= 1, got {prompt.shape}")
    total = prompt.shape[1] + max_new_tokens
    if max_new_tokens < 0 or total > model.config.n_ctx:
        raise ValueError(
            f"generate: {prompt.shape[1]} + {max_new_tokens} tokens do not fit n_ctx = "
            f"{model.config.n_ctx}"
        )
    check_sampling(temperature, top_p)
    if isinstance(generator, int):
        generator = torch.Generator(device=prompt.device).manual_seed(generator)
    was_training = model.training
    model.eval()
    try:
        if fast:
            from sparse_transformer.model import fast_decode  # it imports this module

            mode = fast_decode.default_mode(prompt.device) if fast is True else str(fast)
            options = dict(mode=mode, temperature=temperature, top_p=top_p, generator=generator)
            return fast_decode.generate_static(model, prompt, max_new_tokens, **options)
        cache = model.new_cache()
        out = [prompt]
        logits = model.decode(prompt, cache)[:, -1]  # (B, V): prefill
        for step in range(max_new_tokens):
            token = sample_logits(
                logits, temperature=temperature, top_p=top_p, generator=generator
            )  # (B, 1)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = model.decode(token, cache)[:, -1]  # (B, V)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)  # (B, T0 + max_new_tokens)
