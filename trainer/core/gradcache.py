"""GradCache: one optimizer step over a batch far larger than the encoder's activations allow.

  pass 1  embed every chunk, recording each chunk's RNG state. Chunks whose autograd graphs fit
          a memory budget run with grad and keep their graph (kept_graphs.py); the rest run
          without grad, so memory is one chunk's activations beyond the kept graphs;
  loss    run the loss once on all embeddings (gathered across ranks inside the loss), backward
          to the embeddings only, and cache d loss / d embedding (fp32);
  pass 2  backpropagate each chunk's slice of the cached gradient: through its kept graph, or
          after re-embedding it under the same RNG state (the same dropout masks) and the same
          autocast. When every graph fits, the step is one forward and one backward.

Chunks are planned on the host from the texts' lengths (chunk_plan.py: no host sync per chunk)
and, where the encoder supports it, packed: each chunk's texts in one row of real tokens with
attention kept inside each text (packing.py), so a chunk costs its real tokens, not its padding.

The parameter gradients equal those of one backward through the whole batch. Under DDP the last
chunk is always re-embedded through the wrapper, outside no_sync(), and backpropagated last: its
backward reduces the gradients, once; every other backward (kept graphs, which pass 1 made
without the wrapper, and re-embedded chunks inside no_sync()) runs before it with no reduction
pending. Under a DeepSpeed ZeRO engine the whole of pass 2 runs inside
engine.coalesce_grad_reduction() with engine.backward() per chunk. Either way gradients are
reduced once per step, not once per chunk. Both passes run inside the caller's autocast (and an
optional one of our own), unlike a backward hook that re-embeds outside it and silently falls
back to fp32.

Usable from any loop (graphs kept as memory allows, chunks packed where the model can):

    step = GradCache(encoder, ContrastiveLoss(), chunk_tokens=65536)
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

from trainer.core import distributed
from trainer.core.chunk_plan import LENGTHS, Plan, in_batch_order, plan_chunks
from trainer.core.kept_graphs import AUTO, GraphKeeper
from trainer.core.losses import ContrastiveLoss, LossStats
from trainer.core.memory import is_out_of_memory, release
from trainer.core.rng import RngState
from trainer.core.step_guard import OomGuard, StepOutOfMemory, guarded

Batch = Mapping[str, Tensor]
__all__ = ["GradCache", "StepOutOfMemory", "StepOutput", "StepWork", "RngState", "plan_chunks"]


@dataclass(frozen=True)
class StepWork:
    """What the encoder computed for one step on this rank: for tokens/s, padding and MFU."""

    real_tokens: int
    """Real (non-padding) tokens of the step's texts."""
    computed_tokens: int
    """Tokens one pass over the chunks computes, padding included (= real_tokens when packed)."""
    token_passes: int
    """Sum over chunks of real tokens x forward-pass equivalents: 4 for a re-embedded chunk (no-grad
    forward, forward, backward), 3 for a kept one, 3 for a plain step."""
    attention_passes: int
    """The same sum over each text's length squared (what attention's cost grows with)."""
    chunks: int
    kept_chunks: int


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
    work: StepWork | None = None
    """What the encoder computed."""


def _nan_unless_finite(loss: Tensor) -> Tensor:
    """1 if loss is finite, else nan (a tensor: no host sync). Gradients are multiplied by it so
    that a non-finite loss always gives non-finite gradients, on every rank once they are reduced:
    the optimizer's guard (the run's backends, DeepSpeed's overflow check) then sees it in the norm."""
    return torch.where(torch.isfinite(loss), 1.0, torch.nan).to(loss.dtype)


def _is_deepspeed_engine(module: nn.Module) -> bool:
    # Duck-typed so that DeepSpeed stays an optional dependency of this module.
    return hasattr(module, "coalesce_grad_reduction") and hasattr(module, "backward")


def _work(plans: list[Plan], kept: list[bool] | None) -> StepWork:
    """The step's StepWork; kept None = a plain step (one forward and backward per chunk)."""
    real = sum(int(p.real_tokens.sum()) for p in plans)
    tokens = [t for p in plans for t in p.real_tokens.tolist()]
    pairs = [t for p in plans for t in p.attention_pairs.tolist()]
    passes = [3] * len(tokens) if kept is None else [3 if k else 4 for k in kept]
    return StepWork(real, sum(int(p.computed_tokens.sum()) for p in plans), sum(t * m for t, m in zip(tokens, passes)),
                    sum(a * m for a, m in zip(pairs, passes)), len(tokens), sum(kept) if kept else 0)


class GradCache:
    """One contrastive step, chunked or not, that leaves the full-batch gradients in .grad.

    Args:
        encoder: maps a tokenised batch (keyword tensors) to (rows, d) embeddings; may be wrapped
            by DDP or be a DeepSpeed engine (ZeRO 1-3; the caller then steps the engine).
        loss_fn: the loss over (q, docs); it gathers across ranks itself.
        chunk_size: rows per forward on this rank (queries and documents are chunked separately);
            None or 0 (and no chunk_tokens) runs one plain forward/backward over the whole batch.
        chunk_tokens: also (or instead) cap each chunk at this many tokens (real tokens when
            packed, rows x the longest row when padded).
        sort_by_length: order each side's texts by length before chunking (far less padding);
            the embeddings are put back in the batch's order before the loss, so the loss, its
            masking and the gather see exactly what they see without it.
        autocast_dtype: if set, both passes run under torch.autocast of this dtype (on top of any
            autocast the caller is already in).
        trim_padding: drop each padded chunk's trailing all-padding columns (chunk_plan.py).
        pack: "auto" (pack where the encoder supports it: model.Encoder over a transformers model
            that dispatches attention through AttentionInterface), True (it must), or False.
        keep_graphs: keep pass 1's graphs of as many chunks as fit, so that pass 2 re-embeds only
            the rest: "auto" (the memory the device has left, see kept_graphs.py), a number of
            bytes, True (all of them) or False (re-embed every chunk, the classic GradCache).
        keep_reserve_bytes: with keep_graphs="auto", memory to leave free besides (e.g. the
            optimizer's state, which AdamW allocates at its first step).
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
        pack: bool | str = AUTO,
        keep_graphs: bool | int | str = AUTO,
        keep_reserve_bytes: int = 0,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        recover_oom: bool = False,
    ) -> None:
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 or None = no chunking), got {chunk_size}")
        if chunk_tokens is not None and chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be > 0 (None = no token budget), got {chunk_tokens}")
        self.encoder, self.loss_fn = encoder, loss_fn
        self.chunk_size, self.chunk_tokens = chunk_size or None, chunk_tokens
        self.sort_by_length, self.autocast_dtype, self.trim_padding = sort_by_length, autocast_dtype, trim_padding
        if no_sync is None:
            no_sync = encoder.no_sync if isinstance(encoder, DistributedDataParallel) else contextlib.nullcontext
        self.no_sync = no_sync
        self.grad_scaler = grad_scaler
        self.recover_oom = recover_oom
        self.engine = encoder if _is_deepspeed_engine(encoder) else None
        if self.engine is not None and grad_scaler is not None:
            raise ValueError("a DeepSpeed engine scales its own losses: pass no grad_scaler")
        self.bare = encoder.module if isinstance(encoder, DistributedDataParallel) or self.engine is not None else encoder
        self.pack = _resolve_pack(pack, self.bare)
        self.keeper = _keeper(keep_graphs, self.bare, keep_reserve_bytes)
        # A forward that is a collective (ZeRO-3 gathers weights from every rank) cannot be dropped
        # and run again on one rank alone.
        stage = getattr(self.engine, "zero_optimization_stage", lambda: 0)() if self.engine is not None else 0
        self._forward_is_collective = stage == 3 and distributed.world_size() > 1

    def __call__(
        self,
        queries: Batch,
        docs: Batch,
        query_hashes: Tensor | None = None,
        doc_hashes: Tensor | None = None,
        teacher_scores: Tensor | None = None,
    ) -> StepOutput:
        """queries: b tokenised texts; docs: b * (1 + n) tokenised texts, grouped by query (row
        i's positive, then its n hard negatives); either may carry its lengths on the host
        (chunk_plan.HostLengths under "lengths"). Hashes and teacher scores as in
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
        plans = [plan_chunks(side, sort_by_length=False, trim_padding=self.trim_padding, pack=self.pack)
                 for side in (queries, docs)]
        with self._autocast(queries["input_ids"].device):
            q = self.encoder(**plans[0].chunks[0])
            d = self.encoder(**plans[1].chunks[0])
        d = d.view(q.shape[0], docs_per_query, -1)
        loss = self.loss_fn(q, d, *loss_inputs)
        poisoned = loss * _nan_unless_finite(loss.detach())
        if self.engine is not None:
            self.engine.backward(poisoned)
        else:
            self._scaled(poisoned).backward()
        return StepOutput(loss.detach(), self.loss_fn.last_stats, q.detach(), d.detach(), _work(plans, None))

    def _cached_step(self, queries, docs, docs_per_query, loss_inputs) -> StepOutput:
        device = queries["input_ids"].device
        plans = [plan_chunks(side, self.chunk_size, self.chunk_tokens, self.sort_by_length, self.trim_padding, self.pack)
                 for side in (queries, docs)]
        chunks = plans[0].chunks + plans[1].chunks
        n_query_chunks = len(plans[0].chunks)
        tokens = [int(t) for p in plans for t in p.real_tokens]
        guard = OomGuard(self.bare) if self.recover_oom else None

        graphs: list = []  # filled by pass 1: each chunk's kept graph, or None
        try:
            rng_states, embeddings = self._pass_1(chunks, tokens, device, guard, graphs)
            # The loss, on everything, in the batch's order; backward stops at the (leaf) embeddings.
            with guarded(guard, "the loss", alone=True):
                q = in_batch_order(torch.cat(embeddings[:n_query_chunks]), plans[0].order).requires_grad_()
                d = in_batch_order(torch.cat(embeddings[n_query_chunks:]), plans[1].order)
                d = d.view(q.shape[0], docs_per_query, -1).requires_grad_()
                loss = self.loss_fn(q, d, *loss_inputs)
                loss.backward()
            grads = self._chunk_grads(q, d, loss, plans, embeddings, n_query_chunks)
            kept = [g is not None for g in graphs]  # pass 2 frees each graph once it is spent
            # Pass 2: replay each re-embedded chunk's RNG state, then put the generator back where
            # pass 1 left it, so that the rest of training draws the same numbers as without caching.
            after_pass_1 = RngState()
            if self.engine is not None:
                self._engine_pass_2(chunks, rng_states, graphs, grads, device)
            else:
                self._pass_2(chunks, rng_states, graphs, grads, device, guard)
            after_pass_1.restore()
        except StepOutOfMemory:
            if self.keeper is not None and any(g is not None for g in graphs):
                self.keeper.out_of_memory(while_keeping=False)
            raise
        return StepOutput(loss.detach(), self.loss_fn.last_stats, q.detach(), d.detach(), _work(plans, kept))

    def _chunk_grads(self, q, d, loss, plans, embeddings, n_query_chunks) -> list[Tensor]:
        """Each chunk's slice of the cached gradient, in the order the chunks were cut."""
        poison = _nan_unless_finite(loss.detach())
        q_grad, d_grad = q.grad * poison, d.grad.view(-1, d.shape[-1]) * poison
        if plans[0].order is not None:
            q_grad = q_grad.index_select(0, plans[0].order)
        if plans[1].order is not None:
            d_grad = d_grad.index_select(0, plans[1].order)
        grads = list(q_grad.split([e.shape[0] for e in embeddings[:n_query_chunks]]))
        return grads + list(d_grad.split([e.shape[0] for e in embeddings[n_query_chunks:]]))

    def _pass_1(self, chunks, tokens, device, guard: OomGuard | None, graphs: list) -> tuple[list[RngState], list[Tensor]]:
        """(RNG state before each chunk, detached embeddings); `graphs` gets each chunk's kept
        graph or None. The wrappers are bypassed: DDP has nothing to prepare for a forward whose
        backward comes later, and pass 2 reduces through it."""
        # Under DDP the reducing chunk (the last) is re-embedded through the wrapper in pass 2.
        reembedded = len(chunks) - 1 if isinstance(self.encoder, DistributedDataParallel) else None
        if self.keeper is not None:
            self.keeper.begin_step(max(tokens))
        rng_states, embeddings = [], []
        with guarded(guard, "pass 1"), self._autocast(device):
            for index, chunk in enumerate(chunks):
                rng_states.append(RngState())
                graph = None
                if self.keeper is not None and index != reembedded and self.keeper.fits(tokens[index]):
                    graph = self._kept_forward(chunk, tokens[index], rng_states[-1], device)
                graphs.append(graph)
                if graph is None:
                    embeddings.append(self._forward_without_graph(chunk, rng_states[-1], graphs, device))
                else:
                    embeddings.append(graph.detach())
        return rng_states, embeddings

    def _forward_without_graph(self, chunk, rng: RngState, graphs: list, device) -> Tensor:
        """The chunk embedded without grad. Should that run out of memory while graphs are kept,
        they are dropped (their chunks are re-embedded in pass 2 instead: the same result) and
        the chunk is embedded again from its generator state."""
        try:
            with torch.no_grad():
                return self.bare(**chunk)
        except Exception as err:
            if not is_out_of_memory(err) or self._forward_is_collective or all(g is None for g in graphs):
                raise
        graphs[:] = [None] * len(graphs)
        release(device)  # out of the except block: the failed forward's frames are gone
        self.keeper.out_of_memory(while_keeping=False)
        rng.restore()
        with torch.no_grad():
            return self.bare(**chunk)

    def _kept_forward(self, chunk, tokens: int, rng: RngState, device) -> Tensor | None:
        """The chunk embedded with grad, its graph kept; None if that ran out of memory (then
        nothing of it is left, and the generator is back where the chunk began)."""
        try:
            with self.keeper.keeping(tokens), torch.enable_grad():
                return self.bare(**chunk)
        except Exception as err:
            if not is_out_of_memory(err) or self._forward_is_collective:
                raise
        release(device)  # out of the except block: the failed forward's frames are gone
        self.keeper.out_of_memory(while_keeping=True, tokens=tokens)
        rng.restore()
        return None

    def _backward_chunk(self, chunk, rng: RngState, graph: Tensor | None, grad: Tensor, device) -> None:
        if graph is None:
            rng.restore()
            with self._autocast(device):
                graph = self.encoder(**chunk)
        graph.backward(self._scaled(grad).to(graph.dtype))

    def _pass_2(self, chunks, rng_states, graphs, grads, device, guard: OomGuard | None) -> None:
        """Pass 2 under DDP (or one process): every chunk but the last inside no_sync(), so the
        last one's backward reduces the gradients, once."""
        last = len(chunks) - 1
        # A DDP that broadcasts buffers before each forward makes every chunk a collective.
        collective = isinstance(self.encoder, DistributedDataParallel) and self.encoder.will_sync_module_buffers()
        with guarded(guard, "pass 2", alone=collective):
            for index in range(last):
                with self.no_sync():
                    self._backward_chunk(chunks[index], rng_states[index], graphs[index], grads[index], device)
                graphs[index] = None  # spent: its memory goes back before the next chunk runs
        # The reducing chunk: with one process it may still fail cleanly; with several, a rank
        # that failed here would leave the others inside the reduction.
        with guarded(guard, "pass 2", alone=True):
            self._backward_chunk(chunks[last], rng_states[last], graphs[last], grads[last], device)
            graphs[last] = None

    def _engine_pass_2(self, chunks, rng_states, graphs, grads, device) -> None:
        """Pass 2 through a DeepSpeed engine. engine.backward() takes a scalar, so each chunk
        backpropagates <emb, cached grad>, whose gradient with respect to emb is the cached grad;
        the engine's loss scaling and hooks apply as for any loss. Reduction waits for the block's
        end: one per step."""
        with self.engine.coalesce_grad_reduction():
            for index, (chunk, rng, grad) in enumerate(zip(chunks, rng_states, grads)):
                emb = graphs[index]
                if emb is None:
                    rng.restore()
                    with self._autocast(device):
                        emb = self.engine(**chunk)
                self.engine.backward((emb * grad.to(emb.dtype)).sum())
                graphs[index] = emb = None


def _resolve_pack(pack: bool | str, bare: nn.Module) -> bool:
    supported = bool(getattr(bare, "supports_packing", False))
    if pack == AUTO:
        return supported
    if pack not in (True, False):
        raise ValueError(f"pack must be 'auto', True or False, got {pack!r}")
    if pack and not supported:
        raise ValueError(f"pack=True: {type(bare).__name__} cannot take packed chunks (see trainer.packing)")
    return pack


def _keeper(keep_graphs, bare: nn.Module, reserve_bytes: int) -> GraphKeeper | None:
    if keep_graphs is False:
        return None
    if keep_graphs is not True and keep_graphs != AUTO and (not isinstance(keep_graphs, int) or keep_graphs < 0):
        raise ValueError(f"keep_graphs must be 'auto', True, False or a number of bytes, got {keep_graphs!r}")
    device = next(bare.parameters()).device
    return GraphKeeper(None if keep_graphs is True else keep_graphs, device, reserve_bytes)


def _num_rows(batch: Batch) -> int:
    sizes = {value.shape[0] for key, value in batch.items() if key != LENGTHS}
    if len(sizes) != 1:
        raise ValueError(f"tensors of one batch disagree on the number of rows: {sorted(sizes)}")
    return sizes.pop()
