"""GradCache: one optimizer step over a batch far larger than the encoder's activations allow.

  pass 1  embed every chunk without grad, recording each chunk's RNG state;
  loss    run the loss once on all embeddings (gathered across ranks inside the loss), backward
          to the embeddings only, and cache d loss / d embedding (fp32);
  pass 2  re-embed each chunk with grad under the same RNG state (the same dropout masks) and the
          same autocast, and backpropagate its slice of the cached gradient.

The parameter gradients equal those of one backward through the whole batch. Under DDP every
chunk but the last runs inside no_sync(); under a DeepSpeed ZeRO engine the whole of pass 2 runs
inside engine.coalesce_grad_reduction() with engine.backward() per chunk. Either way gradients are
reduced once per step, not once per chunk. Both passes run inside the caller's autocast (and an optional one of our own), unlike a
backward hook that re-embeds outside it and silently falls back to fp32.

Usable from any loop:

    step = GradCache(encoder, ContrastiveLoss(), chunk_size=64)
    out = step(query_batch, doc_batch)        # fills .grad; returns the loss and stats
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed
from trainer.losses import ContrastiveLoss, LossStats
from trainer.memory import is_out_of_memory

Batch = Mapping[str, Tensor]


class StepOutOfMemory(RuntimeError):
    """A step ran out of memory (on this rank or another) where it could stop cleanly: nothing
    was applied, gradients are None again and the generators are where the step began. Running
    it again with smaller chunks gives exactly what those chunks give (see autochunk.py)."""

    def __init__(self, phase: str, cause: BaseException | None) -> None:
        where = "on this rank" if cause is not None else "on another rank"
        super().__init__(f"out of memory in {phase} {where}" + (f": {cause}" if cause is not None else ""))
        self.phase = phase


@dataclass(frozen=True)
class StepOutput:
    """What one step returns: all detached, all from the passes the step ran anyway."""

    loss: Tensor
    """This rank's loss (the mean over its rows)."""
    stats: LossStats | None
    """Accuracy and similarity figures of the loss call."""
    query_embeddings: Tensor
    """(b, d) this rank's query embeddings, e.g. for an embedding-collapse watch."""
    doc_embeddings: Tensor
    """(b, 1 + n, d) this rank's document embeddings."""


def split_batch(batch: Batch, chunk_size: int, trim_padding: bool = True) -> list[dict[str, Tensor]]:
    """Split a tokenised batch, in its own order, into chunks of at most chunk_size rows (the last
    may be smaller); see plan_chunks for trim_padding."""
    return plan_chunks(batch, chunk_size, sort_by_length=False, trim_padding=trim_padding)[1]


def plan_chunks(
    batch: Batch,
    chunk_size: int | None = None,
    chunk_tokens: int | None = None,
    sort_by_length: bool = True,
    trim_padding: bool = True,
) -> tuple[Tensor | None, list[dict[str, Tensor]]]:
    """The chunks one pass forwards: (order, chunks), where chunk rows are batch rows `order`
    (None = the batch's own order), longest first when sort_by_length.

    Chunks hold at most chunk_size rows and, with chunk_tokens, at most that many padded tokens
    (rows x the chunk's longest row; a row longer than the budget goes alone): short texts go in
    big chunks, long ones in small, and activation memory is bounded by tokens. With
    trim_padding, each chunk drops trailing columns that are padding in all of its rows: a chunk
    of short texts then costs what short texts cost. Only trailing columns go, so the real tokens
    keep their positions and the output is unchanged. Ordered by length, a chunk's rows are of
    about one length, so almost nothing is padding (real text: 46% -> 5% at 4096 x chunk 256).
    """
    rows = _num_rows(batch)
    mask = batch.get("attention_mask")
    lengths = mask.sum(dim=1) if mask is not None else torch.full((rows,), next(iter(batch.values())).shape[1])
    order = torch.sort(lengths, descending=True, stable=True).indices if sort_by_length else None
    if order is not None:
        batch = {key: value.index_select(0, order.to(value.device)) for key, value in batch.items()}
        lengths = lengths.index_select(0, order.to(lengths.device))
    chunks, start = [], 0
    for size in _chunk_sizes(lengths.tolist(), chunk_size, chunk_tokens):
        chunk = {key: value[start : start + size] for key, value in batch.items()}
        if trim_padding and "attention_mask" in chunk:
            length = _used_length(chunk["attention_mask"])
            chunk = {k: v[:, :length] if v.dim() == 2 and v.shape[1] > length else v for k, v in chunk.items()}
        chunks.append(chunk)
        start += size
    return order, chunks


def _chunk_sizes(lengths: list[int], chunk_size: int | None, chunk_tokens: int | None) -> list[int]:
    """Greedy: a chunk grows while it stays within chunk_size rows and chunk_tokens padded tokens."""
    sizes, rows, longest = [], 0, 0
    for length in lengths:
        grown = max(longest, length)
        full = (chunk_size and rows + 1 > chunk_size) or (chunk_tokens and (rows + 1) * grown > chunk_tokens)
        if rows and full:
            sizes.append(rows)
            rows, grown = 0, length
        rows, longest = rows + 1, grown
    return sizes + [rows] if rows else sizes


def _in_batch_order(sorted_rows: Tensor, order: Tensor | None) -> Tensor:
    """Rows computed in `order` back in the batch's own order."""
    if order is None:
        return sorted_rows
    return torch.empty_like(sorted_rows).index_copy_(0, order.to(sorted_rows.device), sorted_rows)


def _num_rows(batch: Batch) -> int:
    sizes = {value.shape[0] for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"tensors of one batch disagree on the number of rows: {sorted(sizes)}")
    return sizes.pop()


def _used_length(attention_mask: Tensor) -> int:
    used_columns = attention_mask.bool().any(dim=0).nonzero()
    return int(used_columns.max()) + 1 if used_columns.numel() else 1


class RngState:
    """The CPU generator and, if CUDA is in use, the current device's generator."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _nan_unless_finite(loss: Tensor) -> Tensor:
    """1 if loss is finite, else nan (a tensor: no host sync). Gradients are multiplied by it so
    that a non-finite loss always gives non-finite gradients, on every rank once they are reduced:
    the optimizer's guard (backends.py, DeepSpeed's overflow check) then sees it in the norm."""
    return torch.where(torch.isfinite(loss), 1.0, torch.nan).to(loss.dtype)


def _is_deepspeed_engine(module: nn.Module) -> bool:
    # Duck-typed so that DeepSpeed stays an optional dependency of this module.
    return hasattr(module, "coalesce_grad_reduction") and hasattr(module, "backward")


class _OomGuard:
    """Turns out-of-memory errors of one step into StepOutOfMemory on every rank at once.

    phase(name): a block whose out-of-memory error is caught; on leaving it every rank says
    whether it failed (one small all-reduce), and if any did, all raise together, having put
    the generators back where the step began and dropped every gradient the step made. A block
    with alone=True is guarded only in a single process: with several, its collectives (the
    loss's gather, DDP's reduction) would be left half done by a rank that stopped.
    """

    def __init__(self, step: GradCache) -> None:
        module = step.encoder
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        if any(p.grad is not None for p in self.parameters):
            raise ValueError("recover_oom needs the gradients cleared (None) before the step")
        self.rng = RngState()
        self.single = distributed.world_size() == 1

    @contextlib.contextmanager
    def phase(self, name: str, alone: bool = False):
        if alone and not self.single:
            yield
            return
        failure = None
        try:
            yield
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            failure = err
        if distributed.any_rank(failure is not None):
            for p in self.parameters:
                p.grad = None
            self.rng.restore()
            raise StepOutOfMemory(name, failure) from failure


class GradCache:
    """One contrastive step, chunked or not, that leaves the full-batch gradients in .grad.

    Args:
        encoder: maps a tokenised batch (keyword tensors) to (rows, d) embeddings; may be wrapped
            by DDP or be a DeepSpeed engine (ZeRO 1-3; the caller then steps the engine).
        loss_fn: the loss over (q, docs); it gathers across ranks itself.
        chunk_size: rows per forward on this rank (queries and documents are chunked separately);
            None or 0 (and no chunk_tokens) runs one plain forward/backward over the whole batch.
        chunk_tokens: also (or instead) cap each chunk at this many padded tokens.
        sort_by_length: order each side's texts by length before chunking (far less padding);
            the embeddings are put back in the batch's order before the loss, so the loss, its
            masking and the gather see exactly what they see without it.
        autocast_dtype: if set, both passes run under torch.autocast of this dtype (on top of any
            autocast the caller is already in).
        trim_padding: drop each chunk's trailing all-padding columns (see split_batch).
        no_sync: a context manager factory that suspends gradient reduction; defaults to
            encoder.no_sync for DDP and to nothing otherwise.
        grad_scaler: for fp16, a torch.amp.GradScaler: every backward then runs on the scaled
            gradient (the caller unscales and steps through the scaler as usual).
        recover_oom: turn an out-of-memory error into StepOutOfMemory wherever the step can stop
            cleanly on every rank: pass 1 (ranks agree before the loss's gather), every chunk of
            pass 2 but the one that reduces gradients (agreed before it), and with one process
            anywhere. Not for a DeepSpeed engine's pass 2, nor for models whose forward is itself
            a collective (ZeRO-3 on several ranks): the caller leaves it off there. Needs .grad
            to be None when the step starts (as zero_grad(set_to_none=True) leaves it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss_fn: ContrastiveLoss,
        chunk_size: int | None = None,
        *,
        chunk_tokens: int | None = None,
        sort_by_length: bool = True,
        autocast_dtype: torch.dtype | None = None,
        trim_padding: bool = True,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        recover_oom: bool = False,
    ) -> None:
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 or None = no chunking), got {chunk_size}")
        self.encoder = encoder
        self.loss_fn = loss_fn
        if chunk_tokens is not None and chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be > 0 (None = no token budget), got {chunk_tokens}")
        self.chunk_size = chunk_size or None
        self.chunk_tokens = chunk_tokens
        self.sort_by_length = sort_by_length
        self.autocast_dtype = autocast_dtype
        self.trim_padding = trim_padding
        if no_sync is None:
            no_sync = encoder.no_sync if isinstance(encoder, DistributedDataParallel) else contextlib.nullcontext
        self.no_sync = no_sync
        self.grad_scaler = grad_scaler
        self.recover_oom = recover_oom
        self.engine = encoder if _is_deepspeed_engine(encoder) else None
        if self.engine is not None and grad_scaler is not None:
            raise ValueError("a DeepSpeed engine scales its own losses: pass no grad_scaler")

    def __call__(
        self,
        queries: Batch,
        docs: Batch,
        query_hashes: Tensor | None = None,
        doc_hashes: Tensor | None = None,
        teacher_scores: Tensor | None = None,
    ) -> StepOutput:
        """queries: b tokenised texts; docs: b * (1 + n) tokenised texts, grouped by query (row
        i's positive, then its n hard negatives). Hashes and teacher scores as in
        ContrastiveLoss.forward."""
        b = _num_rows(queries)
        n_docs = _num_rows(docs)
        if n_docs % b:
            raise ValueError(f"{n_docs} documents for {b} queries: expected b * (1 + n) documents")
        docs_per_query = n_docs // b
        # Everything the loss reads besides the embeddings: hashes, and teacher scores if any.
        loss_inputs = (query_hashes, doc_hashes) + ((teacher_scores,) if teacher_scores is not None else ())
        if self.chunk_size is None and self.chunk_tokens is None:
            return self._plain_step(queries, docs, docs_per_query, loss_inputs)
        return self._cached_step(queries, docs, docs_per_query, loss_inputs)

    def _scaled(self, tensor: Tensor) -> Tensor:
        return tensor if self.grad_scaler is None else self.grad_scaler.scale(tensor)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _plain_step(self, queries, docs, docs_per_query, loss_inputs) -> StepOutput:
        device = queries["input_ids"].device
        with self._autocast(device):
            q = self.encoder(**queries)
            d = self.encoder(**docs)
        d = d.view(q.shape[0], docs_per_query, -1)
        loss = self.loss_fn(q, d, *loss_inputs)
        poisoned = loss * _nan_unless_finite(loss.detach())
        if self.engine is not None:
            self.engine.backward(poisoned)
        else:
            self._scaled(poisoned).backward()
        return StepOutput(loss.detach(), self.loss_fn.last_stats, q.detach(), d.detach())

    def _cached_step(self, queries, docs, docs_per_query, loss_inputs) -> StepOutput:
        device = queries["input_ids"].device
        plan = dict(chunk_size=self.chunk_size, chunk_tokens=self.chunk_tokens, sort_by_length=self.sort_by_length,
                    trim_padding=self.trim_padding)
        query_order, chunks = plan_chunks(queries, **plan)
        n_query_chunks = len(chunks)
        doc_order, doc_chunks = plan_chunks(docs, **plan)
        chunks += doc_chunks
        guard = _OomGuard(self) if self.recover_oom else None

        # Pass 1: no graph, so memory is one chunk's activations. DDP's wrapper is bypassed: it
        # has nothing to prepare for a forward without backward.
        rng_states, embeddings = self._pass_1(chunks, device, guard)

        # The loss, on everything, in the batch's order; backward stops at the (leaf) embeddings.
        with guard.phase("the loss", alone=True) if guard else contextlib.nullcontext():
            q = _in_batch_order(torch.cat(embeddings[:n_query_chunks]), query_order).requires_grad_()
            d = _in_batch_order(torch.cat(embeddings[n_query_chunks:]), doc_order)
            d = d.view(q.shape[0], docs_per_query, -1).requires_grad_()
            loss = self.loss_fn(q, d, *loss_inputs)
            loss.backward()
        # Each chunk's slice of the cached gradient, in the order the chunks were cut.
        poison = _nan_unless_finite(loss.detach())
        q_grad, d_grad = q.grad * poison, d.grad.view(-1, d.shape[-1]) * poison
        if query_order is not None:
            q_grad = q_grad.index_select(0, query_order.to(q_grad.device))
        if doc_order is not None:
            d_grad = d_grad.index_select(0, doc_order.to(d_grad.device))
        grads = list(q_grad.split([e.shape[0] for e in embeddings[:n_query_chunks]]))
        grads += d_grad.split([e.shape[0] for e in embeddings[n_query_chunks:]])

        # Pass 2: replay each chunk's RNG state, then put the generator back where pass 1 left it,
        # so that the rest of training draws the same numbers as without caching.
        after_pass_1 = RngState()
        if self.engine is not None:
            self._engine_pass_2(chunks, rng_states, grads, device)
        else:
            self._pass_2(chunks, rng_states, grads, device, guard)
        after_pass_1.restore()
        return StepOutput(loss.detach(), self.loss_fn.last_stats, q.detach(), d.detach())

    def _pass_1(self, chunks, device, guard: _OomGuard | None) -> tuple[list[RngState], list[Tensor]]:
        wrapped = isinstance(self.encoder, DistributedDataParallel) or self.engine is not None
        embed = self.encoder.module if wrapped else self.encoder
        rng_states, embeddings = [], []
        with guard.phase("pass 1") if guard else contextlib.nullcontext():
            with torch.no_grad(), self._autocast(device):
                for chunk in chunks:
                    rng_states.append(RngState())
                    embeddings.append(embed(**chunk))
        return rng_states, embeddings

    def _pass_2(self, chunks, rng_states, grads, device, guard: _OomGuard | None) -> None:
        """Pass 2 under DDP (or one process): every chunk but the last inside no_sync(), so the
        last one's backward reduces the gradients, once."""
        last = len(chunks) - 1
        # A DDP that broadcasts buffers before each forward makes every chunk a collective.
        collective = isinstance(self.encoder, DistributedDataParallel) and self.encoder.will_sync_module_buffers()
        with guard.phase("pass 2", alone=collective) if guard else contextlib.nullcontext():
            for index, (chunk, rng, grad) in enumerate(zip(chunks, rng_states, grads)):
                if index == last:
                    break
                rng.restore()
                with self.no_sync():
                    with self._autocast(device):
                        emb = self.encoder(**chunk)
                    emb.backward(self._scaled(grad).to(emb.dtype))
        # The reducing chunk: with one process it may still fail cleanly; with several, a rank
        # that failed here would leave the others inside the reduction.
        with guard.phase("pass 2", alone=True) if guard else contextlib.nullcontext():
            rng_states[last].restore()
            with self._autocast(device):
                emb = self.encoder(**chunks[last])
            emb.backward(self._scaled(grads[last]).to(emb.dtype))

    def _engine_pass_2(self, chunks, rng_states, grads, device) -> None:
        """Pass 2 through a DeepSpeed engine. engine.backward() takes a scalar, so each chunk
        backpropagates <emb, cached grad>, whose gradient with respect to emb is the cached grad;
        the engine's loss scaling and hooks apply as for any loss. Reduction waits for the block's
        end: one per step."""
        with self.engine.coalesce_grad_reduction():
            for chunk, rng, grad in zip(chunks, rng_states, grads):
                rng.restore()
                with self._autocast(device):
                    emb = self.engine(**chunk)
                self.engine.backward((emb * grad.to(emb.dtype)).sum())
