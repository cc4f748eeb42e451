"""Chunk and batch sizes the framework picks, and changes when memory runs out.

GradCache's result does not depend on how a step is chunked (exact, dropout replayed), so the
chunk is ours to choose:
- before step 1, `probe_chunk_tokens` finds the largest token budget whose forward and backward
  fit in the memory left, on the run's own model (precision, LoRA, checkpointing as configured),
  at the longest texts the run can see (every row at the max length);
- during training, `AdaptiveStep` runs the step, and when it runs out of memory where it can stop
  cleanly (gradcache.StepOutOfMemory), halves the budget and runs the same step again: the result
  is what the smaller budget gives, so the loss curve does not move.
The same for embedding (evaluation, mining): `probe_batch_rows` for a forward-only batch, and
`split_on_oom`, which embeds a batch that ran out of memory in two halves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.core import distributed
from trainer.core.gradcache import GradCache, RngState, StepOutOfMemory
from trainer.core.memory import (
    HEADROOM,
    PeakMemory,
    available_bytes,
    is_out_of_memory,
    release,
)

AUTO = "auto"


def parse_size(value, key: str) -> int | str | None:
    """A config size: a positive int, 'auto', or 0 / None (off)."""
    if value is None or value == 0:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a positive integer or 'auto', got {value!r}") from None
    if size < 0:
        raise ValueError(f"{key} must be a positive integer or 'auto', got {value!r}")
    return size or None


@dataclass(frozen=True)
class ProbeResult:
    rows: int
    """Rows at max_length that fit (the answer)."""
    peak_bytes: int | None
    """What those rows used at their peak (None where the platform cannot tell)."""
    available_bytes: int
    """Memory left when the probe began, less the reserve."""


def longest_input(encoder: nn.Module, max_length: int) -> int:
    """The longest input a run can feed: max_length, unless the model's positions end sooner
    (RoBERTa-style models start counting positions after the padding id)."""
    config = encoder.backbone.config
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return max_length
    if "roberta" in getattr(config, "model_type", ""):
        positions -= (config.pad_token_id or 0) + 1
    return max(1, min(max_length, positions))


def _random_rows(rows: int, length: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(min(1000, vocab_size // 2), vocab_size, (rows, length), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(rows, length, dtype=torch.long, device=device)}


def largest_fitting(trial: Callable[[int], None], device: torch.device, start: int, cap: int, reserve: int = 0) -> ProbeResult:
    """The largest n in [1, cap] for which trial(n) fits in the memory left minus `reserve` (with
    HEADROOM), within 2x: from `start`, n halves until it fits, or doubles while the measured
    peak says twice as much fits; the last step up is interpolated (memory grows linearly in n)
    and tried once. Raises if even n = 1 runs out of memory."""
    release(device)
    available = available_bytes(device) - reserve
    n = max(1, min(start, cap))
    fitted, peak = _try(trial, n, device)
    while not fitted:  # too big already: the largest that fits is below n
        if n == 1:
            raise RuntimeError(f"out of memory at the smallest size tried (1); nothing fits in the {available / 2**30:.2f} GiB left")
        n //= 2
        fitted, peak = _try(trial, n, device)
        if fitted:
            return ProbeResult(n, peak, available)
    while True:
        best = ProbeResult(n, peak, available)
        if n >= cap:
            return best
        if peak is not None and 2 * peak > HEADROOM * available:
            guess = min(cap, int(n * HEADROOM * available / max(peak, 1)))
            if guess <= n:
                return best
            fitted, peak = _try(trial, guess, device)
            return ProbeResult(guess, peak, available) if fitted else best
        fitted, peak = _try(trial, min(2 * n, cap), device)  # twice as much fits (or nothing tells: let the allocator say)
        if not fitted:
            return best
        n = min(2 * n, cap)


def _try(trial: Callable[[int], None], n: int, device: torch.device) -> tuple[bool, int | None]:
    try:
        with PeakMemory(device) as peak:
            trial(n)
        return True, peak.bytes
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        return False, None
    finally:
        release(device)


def probe_chunk_tokens(
    encoder: nn.Module,
    device: torch.device,
    max_length: int,
    cap_rows: int,
    autocast_dtype: torch.dtype | None = None,
    reserve_bytes: int = 0,
) -> ProbeResult:
    """The largest chunk (rows of max_length tokens, at most cap_rows) whose forward and backward
    (pass 2's work) fit in the memory left, less `reserve_bytes` (e.g. the optimizer's state,
    which AdamW allocates at its first step). Call it on the bare encoder, before a DDP or
    DeepSpeed wrapper exists (their hooks would reduce the probe's gradients). Leaves the
    gradients None and the random generators as it found them."""
    vocab_size = encoder.backbone.config.vocab_size
    max_length = longest_input(encoder, max_length)
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    rng = RngState()
    was_training = encoder.training
    encoder.train()

    def trial(rows: int) -> None:
        try:
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                embeddings = encoder(**_random_rows(rows, max_length, vocab_size, device))
            embeddings.float().pow(2).sum().backward()
        finally:
            for p in parameters:
                p.grad = None

    try:
        return largest_fitting(trial, device, start=8, cap=cap_rows, reserve=reserve_bytes)
    finally:
        rng.restore()
        encoder.train(was_training)


def probe_embedding_batch(
    encoder: nn.Module, device: torch.device, max_length: int, autocast_dtype: torch.dtype | None = None,
    cap_rows: int = 4096, reserve_bytes: int = 0,
) -> int:
    """The largest batch (rows of max_length tokens, at most cap_rows) whose forward without grad
    fits, in eval mode, agreed over ranks (the smallest answer): for evaluation and mining."""
    vocab_size = encoder.backbone.config.vocab_size
    max_length = longest_input(encoder, max_length)
    was_training = encoder.training
    encoder.eval()

    def trial(rows: int) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            encoder(**_random_rows(rows, max_length, vocab_size, device))

    try:
        rows = largest_fitting(trial, device, start=16, cap=cap_rows, reserve=reserve_bytes).rows
    finally:
        encoder.train(was_training)
    return distributed.min_over_ranks(rows)


def embedding_batch_size(value, key: str, encoder: nn.Module, device: torch.device, max_length: int,
                         autocast_dtype: torch.dtype | None = None, say: Callable[[str], None] = print) -> int:
    """A tool's batch_size setting: a positive int as given, or 'auto' probed on the encoder."""
    size = parse_size(value, key)
    if size is None:
        raise ValueError(f"{key} must be a positive integer or 'auto', got {value!r}")
    if size == AUTO:
        size = probe_embedding_batch(encoder, device, max_length, autocast_dtype)
        say(f"{key}: {size} texts of {longest_input(encoder, max_length)} tokens per forward")
    return size


def training_reserve(encoder: nn.Module, stash_rows: int) -> int:
    """Memory a training step holds beyond a chunk's activations: AdamW's two fp32 moments and a
    gradient bucket per trainable parameter (DDP; ZeRO holds less), and the cached embeddings of
    the rank's batch with their gradients (fp32)."""
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    width = encoder.backbone.config.hidden_size
    return 12 * trainable + 2 * 4 * stash_rows * width


class AdaptiveStep:
    """A GradCache step that halves its chunk budget and runs again when it runs out of memory.

    `changes` records (step call, old budget, new budget, phase) for the logs; `say` prints each.
    """

    def __init__(self, step: GradCache, device: torch.device, say: Callable[[str], None] = print) -> None:
        if not step.recover_oom:
            raise ValueError("AdaptiveStep needs a GradCache built with recover_oom=True")
        self.step, self.device, self.say = step, device, say
        self.changes: list[tuple[int, int, int, str]] = []
        self.calls = 0

    @property
    def budget(self) -> int:
        """The chunk budget in force: tokens if capped by tokens, else rows."""
        return self.step.chunk_tokens or self.step.chunk_size

    def __call__(self, *args, **kwargs):
        self.calls += 1
        while True:
            try:
                return self.step(*args, **kwargs)
            except StepOutOfMemory as err:
                phase, message = err.phase, str(err)
            # Out of the except block: the error's traceback (and the failed attempt's tensors in
            # its frames) is gone before memory is given back.
            old = self.budget
            self._halve(message)
            release(self.device)
            self.changes.append((self.calls, old, self.budget, phase))
            unit = "tokens" if self.step.chunk_tokens else "rows"
            self.say(f"{message}; chunk budget {old} -> {self.budget} {unit}, running the step again")

    def _halve(self, message: str) -> None:
        step = self.step
        if (step.chunk_tokens or 2) <= 1 or (step.chunk_size or 2) <= 1:
            raise RuntimeError(
                f"{message}, and the chunks are already one text each: what does not fit is not the chunk "
                "(the loss over the whole batch? set loss.tile_size, or a smaller data.batch_size)"
            )
        if step.chunk_tokens:
            step.chunk_tokens //= 2
        if step.chunk_size:
            step.chunk_size = max(step.chunk_size // 2, 1)


def split_on_oom(embed: Callable[[list[str]], torch.Tensor], device: torch.device) -> Callable[[list[str]], torch.Tensor]:
    """`embed` that, when a batch runs out of memory, embeds its two halves instead (and so on):
    the same embeddings, up to rounding. Only for forwards that are not collectives."""

    def embed_or_split(texts: list[str]) -> torch.Tensor:
        try:
            return embed(texts)
        except Exception as err:
            if not is_out_of_memory(err) or len(texts) == 1:
                raise
        release(device)  # after the except block, which held the failed forward's frames
        half = len(texts) // 2
        return torch.cat([embed_or_split(texts[:half]), embed_or_split(texts[half:])])

    return embed_or_split
