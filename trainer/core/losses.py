"""The InfoNCE / Multiple Negatives Ranking loss family, exact across ranks.

Inputs per rank: queries q (b, d) and documents docs (b, 1 + n, d), docs[:, 0] the positive of
each query and docs[:, 1:] its n hard negatives. Under torch.distributed (world size W > 1), q
and docs of all ranks are gathered with gradients: rows stay local, columns are global. Local
row i of rank r is global row g = r * b + i; document columns are ordered by slot (all
positives first, then all first hard negatives, ...), so column k = c * N + g with N = W * b.

A loss is a set of `directions`, each a block of scores for local row i:
  query_to_doc    s(q_g, every doc column)          nothing masked; holds the positive (col g)
  query_to_query  s(q_g, every global query)        the row's own query masked
  doc_to_query    s(positive_g, every global query) nothing masked (col g repeats the positive)
  doc_to_doc      s(positive_g, every doc column)   the row's own group (positive + negatives) masked
and a `partition`: "joint" takes one logsumexp over all chosen blocks, "per_direction" the mean
of one logsumexp per block. Loss per row = that minus the positive score s(q_g, positive_g);
the loss is the mean over local rows. s is cosine similarity / temperature. These are the
semantics of sentence-transformers' MultipleNegativesRankingLoss (v5.3+), checked number for
number in tests/test_losses.py.

Matryoshka (matryoshka_dims): the weighted sum of that loss on the embeddings truncated to each
size and normalised again (sentence-transformers' MatryoshkaLoss), from one gather at full size.

Distillation (distill="kl" | "margin_mse", distill.py): a teacher's scores of each row's own group
against the student's cosines of it, added with a weight: contrastive_weight x the loss above +
distill_weight x the distillation term, computed on the same embeddings (so under GradCache, the
gather and ZeRO alike), at every Matryoshka size.

Both partitions reduce to one logsumexp per block (joint = logsumexp of the block logsumexps),
which is what lets the tiled variant stream over columns without ever holding a full block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.core.distill import METHODS as DISTILL_METHODS
from trainer.core.distill import group_cosines, kl_term, margin_mse_term, rank_agreement
from trainer.core.global_batch import GlobalBatch, gather_global_batch
from trainer.core.tiled_lse import MaskFn, TiledLogSumExp, hardest_negative

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITIONS = ("joint", "per_direction")
PRESETS: dict[str, tuple[tuple[str, ...], str]] = {
    "infonce": (("query_to_doc",), "joint"),
    "symmetric": (("query_to_doc", "doc_to_query"), "per_direction"),
    "gte": (DIRECTIONS, "joint"),
}


@dataclass(frozen=True)
class LossStats:
    """Training-health figures over this rank's rows, computed in the loss's own pass (detached)."""

    accuracy: Tensor
    """Fraction of rows whose positive scores above every unmasked query_to_doc negative."""
    pos_sim: Tensor
    """Mean cosine similarity of each query to its positive."""
    neg_sim: Tensor
    """Mean over rows of the highest cosine among the row's unmasked query_to_doc negatives."""


@dataclass(frozen=True)
class _Block:
    """One direction: local anchors scored against global columns."""

    name: str
    anchors: Tensor  # (b, d)
    columns: Tensor  # (M, d)
    columns_are_docs: bool
    has_target: bool  # column g is the row's positive pair (query_to_doc, doc_to_query)




class ContrastiveLoss(nn.Module):
    """InfoNCE-family loss over the global batch. See the module docstring for the semantics.

    Args:
        temperature: scores are cosine / temperature (sentence-transformers' scale = 1 / temperature).
        directions: a subset of DIRECTIONS; query_to_doc is required (it holds the positive).
        partition: "joint" or "per_direction" (the latter only with query_to_doc and doc_to_query).
        mask_duplicates: mask false negatives that are the same text as the row's target, across
            the global batch; forward() must then get query_hashes and doc_hashes. A document
            column is masked when its hash equals the row's positive hash; a query column when its
            hash equals the row's query hash or its own positive's hash equals the row's positive
            hash (that query is a true pair of the row's positive). The target column never is.
        false_negative_margin: if set, mask every non-target column whose cosine exceeds the
            row's positive cosine by more than this margin (e.g. 0.1).
        tile_size: if set, stream over column tiles of this many columns with a custom autograd
            function that recomputes tiles in backward: same values and gradients, memory O(b * tile)
            for the scores instead of O(b * C * N).
        gather: gather q and docs across ranks when torch.distributed is initialised with W > 1.
        matryoshka_dims: if set, the loss is the weighted sum over these sizes of the loss on the
            first `dim` coordinates of every embedding, normalised again (a size may equal the
            full one). The embeddings are gathered once; the training-health figures are the
            largest size's.
        matryoshka_weights: one weight per size (default 1 each).
        distill: None, "kl" or "margin_mse": add a distillation term towards teacher scores of each
            row's group (forward() then needs teacher_scores); see distill.py.
        distill_weight: its weight in the total.
        contrastive_weight: the weight of the contrastive loss in the total (0 = distillation alone).
        teacher_temperature: the teacher's softmax temperature for "kl" (its scores' own scale).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        directions: tuple[str, ...] | list[str] = ("query_to_doc",),
        partition: str = "joint",
        *,
        mask_duplicates: bool = False,
        false_negative_margin: float | None = None,
        tile_size: int | None = None,
        gather: bool = True,
        matryoshka_dims: tuple[int, ...] | list[int] | None = None,
        matryoshka_weights: tuple[float, ...] | list[float] | None = None,
        distill: str | None = None,
        distill_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        teacher_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if distill is not None and distill not in DISTILL_METHODS:
            raise ValueError(f"distill must be one of {DISTILL_METHODS} or None, got {distill!r}")
        if not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        if distill_weight < 0 or contrastive_weight < 0 or (distill is not None and distill_weight + contrastive_weight == 0):
            raise ValueError(f"the weights must be >= 0 and not both 0, got distill_weight={distill_weight}, "
                             f"contrastive_weight={contrastive_weight}")
        self.distill, self.teacher_temperature = distill, float(teacher_temperature)
        self.distill_weight, self.contrastive_weight = float(distill_weight), float(contrastive_weight)
        self.last_parts: dict[str, Tensor] = {}
        directions = tuple(directions)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions:
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions}")
        if len(set(directions)) != len(directions):
            raise ValueError(f"directions has repeats: {directions}")
        if "query_to_doc" not in directions:
            raise ValueError("directions must include 'query_to_doc': it holds the positive pair")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if partition == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
            raise ValueError(
                "partition='per_direction' needs every direction to contain the positive pair; "
                "query_to_query and doc_to_doc never do. Use partition='joint' with them."
            )
        if tile_size is not None and (int(tile_size) != tile_size or tile_size < 1):
            raise ValueError(f"tile_size must be a positive integer or None, got {tile_size}")
        if matryoshka_dims is not None:
            dims = list(matryoshka_dims)
            if not dims or any(int(d) != d or d < 1 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"matryoshka_dims must be distinct positive integers, got {matryoshka_dims}")
            if matryoshka_weights is not None and (
                len(matryoshka_weights) != len(dims) or any(not w > 0 for w in matryoshka_weights)
            ):
                raise ValueError(
                    f"matryoshka_weights must be {len(dims)} positive numbers (one per size), got {matryoshka_weights}"
                )
        elif matryoshka_weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        self.matryoshka_dims = None if matryoshka_dims is None else tuple(int(d) for d in matryoshka_dims)
        self.matryoshka_weights = (
            None if self.matryoshka_dims is None
            else tuple(float(w) for w in (matryoshka_weights or [1.0] * len(self.matryoshka_dims)))
        )
        self.temperature = float(temperature)
        # Keep the blocks in the canonical order whatever order the caller listed them in.
        self.directions = tuple(d for d in DIRECTIONS if d in directions)
        self.partition = partition
        self.mask_duplicates = bool(mask_duplicates)
        self.false_negative_margin = None if false_negative_margin is None else float(false_negative_margin)
        self.tile_size = None if tile_size is None else int(tile_size)
        self.gather = gather
        self.last_stats: LossStats | None = None

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> ContrastiveLoss:
        """infonce = (query_to_doc,), joint; symmetric = (query_to_doc, doc_to_query),
        per_direction; gte = all four, joint. kwargs go to the constructor."""
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(PRESETS)}")
        directions, partition = PRESETS[name]
        return cls(directions=directions, partition=partition, **kwargs)

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, directions={self.directions}, partition={self.partition!r}, "
            f"mask_duplicates={self.mask_duplicates}, false_negative_margin={self.false_negative_margin}, "
            f"tile_size={self.tile_size}, matryoshka_dims={self.matryoshka_dims}, "
            f"matryoshka_weights={self.matryoshka_weights}, distill={self.distill!r}, "
            f"distill_weight={self.distill_weight}, contrastive_weight={self.contrastive_weight}, "
            f"teacher_temperature={self.teacher_temperature}"
        )

    def forward(
        self,
        q: Tensor,
        docs: Tensor,
        query_hashes: Tensor | None = None,
        doc_hashes: Tensor | None = None,
        teacher_scores: Tensor | None = None,
    ) -> Tensor:
        """Loss (a scalar) for queries q (b, d) and documents docs (b, 1 + n, d) or (b, d).

        query_hashes (b,) and doc_hashes (b, 1 + n) are int64 text hashes, needed only with
        mask_duplicates; teacher_scores (b, 1 + n), only with distill (nan = not scored). The
        training-health figures of this call land in `self.last_stats`, and with distill the
        parts of the total in `self.last_parts` (contrastive, distill, rank_agreement).
        """
        if docs.dim() == 2:
            docs = docs.unsqueeze(1)
        self._check_shapes(q, docs, query_hashes, doc_hashes, teacher_scores)
        # The loss is always computed in at least fp32, outside any autocast of the caller: in
        # bf16 the scores of 32K columns would lose the differences the softmax is about.
        with torch.autocast(device_type=q.device.type, enabled=False):
            full = gather_global_batch(q, docs, query_hashes, doc_hashes, self.gather, self.mask_duplicates)
            teacher = None if teacher_scores is None else teacher_scores.to(full.queries.device, full.queries.dtype)
            sizes = [(None, 1.0)] if self.matryoshka_dims is None else list(zip(self.matryoshka_dims, self.matryoshka_weights))
            if self.matryoshka_dims is not None and max(self.matryoshka_dims) > q.shape[1]:
                raise ValueError(f"matryoshka_dims {self.matryoshka_dims} exceed the embedding size {q.shape[1]}")
            largest = max(dim or 0 for dim, _ in sizes)
            loss, parts = 0.0, {}
            for dim, weight in sizes:
                dim_loss, dim_stats, dim_parts = self._loss(full if dim is None else full.truncated(dim), teacher)
                loss = loss + weight * dim_loss
                if (dim or 0) == largest:
                    stats, parts["rank_agreement"] = dim_stats, dim_parts.pop("rank_agreement", None)
                for key, value in dim_parts.items():
                    parts[key] = parts.get(key, 0.0) + weight * value
        self.last_stats = stats
        self.last_parts = {k: v.detach() for k, v in parts.items() if v is not None}
        return loss

    def _loss(self, batch: GlobalBatch, teacher: Tensor | None) -> tuple[Tensor, LossStats, dict]:
        blocks = self._blocks(batch)
        if self.tile_size is None:
            block_lses, hardest = self._dense_block_lses(blocks, batch)
        else:
            block_lses, hardest = self._tiled_block_lses(blocks, batch)
        stacked = torch.stack(block_lses, dim=1)
        log_z = torch.logsumexp(stacked, dim=1) if self.partition == "joint" else stacked.mean(dim=1)
        loss = (log_z - batch.pos_cos * self.scale).mean()
        stats = _stats(batch.pos_cos.detach(), hardest)
        if self.distill is None:
            return loss, stats, {}
        cosines = group_cosines(batch.queries, batch.doc_columns, batch.rows, batch.num_rows)
        if self.distill == "kl":
            distill = kl_term(cosines, teacher, self.temperature, self.teacher_temperature)
        else:
            distill = margin_mse_term(cosines, teacher)
        total = self.contrastive_weight * loss + self.distill_weight * distill
        return total, stats, {"contrastive": loss, "distill": distill, "rank_agreement": rank_agreement(cosines, teacher)}

    def _check_shapes(self, q: Tensor, docs: Tensor, query_hashes: Tensor | None, doc_hashes: Tensor | None,
                      teacher_scores: Tensor | None = None) -> None:
        if q.dim() != 2 or docs.dim() != 3 or docs.shape[0] != q.shape[0] or docs.shape[2] != q.shape[1]:
            raise ValueError(
                f"expected q of shape (b, d) and docs of shape (b, 1 + n, d); got {tuple(q.shape)} and {tuple(docs.shape)}"
            )
        if self.distill is not None:
            if teacher_scores is None:
                raise ValueError(f"distill={self.distill!r} needs teacher_scores (b, 1 + n)")
            if tuple(teacher_scores.shape) != tuple(docs.shape[:2]):
                raise ValueError(f"teacher_scores of shape {tuple(teacher_scores.shape)} do not match docs {tuple(docs.shape)}")
            if docs.shape[1] < 2:
                raise ValueError("distillation needs hard negatives: a group of one document has nothing to rank")
        if not self.mask_duplicates:
            return
        if query_hashes is None or doc_hashes is None:
            raise ValueError("mask_duplicates=True needs query_hashes (b,) and doc_hashes (b, 1 + n)")
        if tuple(query_hashes.shape) != (q.shape[0],) or tuple(doc_hashes.shape) != tuple(docs.shape[:2]):
            raise ValueError(
                f"hash shapes {tuple(query_hashes.shape)} / {tuple(doc_hashes.shape)} do not match "
                f"q {tuple(q.shape)} / docs {tuple(docs.shape)}"
            )

    def _blocks(self, batch: GlobalBatch) -> list[_Block]:
        anchors = {"query": batch.queries, "doc": batch.positives}
        columns = {"query": batch.all_queries, "doc": batch.doc_columns}
        blocks = []
        for name in self.directions:
            anchor_kind, column_kind = name.split("_to_")
            blocks.append(
                _Block(
                    name=name,
                    anchors=anchors[anchor_kind],
                    columns=columns[column_kind],
                    columns_are_docs=column_kind == "doc",
                    has_target=name in ("query_to_doc", "doc_to_query"),
                )
            )
        return blocks

    def _mask_fn(self, block: _Block, batch: GlobalBatch) -> MaskFn:
        """The masks of a block, for any tile of its columns (the dense path asks for one tile)."""
        n_rows = batch.num_rows
        g = batch.rows[:, None]

        def masks(cos: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
            cols = torch.arange(start, start + cos.shape[1], device=cos.device)[None, :]
            masked = torch.zeros(cos.shape, dtype=torch.bool, device=cos.device)
            if block.name == "query_to_query":
                masked |= cols == g
            elif block.name == "doc_to_doc":
                masked |= cols % n_rows == g
            target = (cols == g) if block.has_target else None
            candidate = ~target if target is not None else None
            false_negative = torch.zeros_like(masked)
            if self.mask_duplicates:
                cols_1d = cols[0]
                if block.columns_are_docs:
                    false_negative |= batch.doc_col_hash[cols_1d][None, :] == batch.pos_hash[:, None]
                else:
                    false_negative |= batch.all_query_hash[cols_1d][None, :] == batch.query_hash[:, None]
                    false_negative |= batch.all_pos_hash[cols_1d][None, :] == batch.pos_hash[:, None]
            if self.false_negative_margin is not None:
                false_negative |= cos.detach() > batch.pos_cos.detach()[:, None] + self.false_negative_margin
            if candidate is not None:
                false_negative &= candidate
            return masked | false_negative, target

        return masks

    def _dense_block_lses(self, blocks: list[_Block], batch: GlobalBatch) -> tuple[list[Tensor], Tensor]:
        lses, hardest = [], None
        for block in blocks:
            mask_fn = self._mask_fn(block, batch)
            cos = block.anchors @ block.columns.T
            masked, target = mask_fn(cos, 0)
            lses.append(torch.logsumexp((cos * self.scale).masked_fill(masked, float("-inf")), dim=1))
            if block.name == "query_to_doc":
                hardest = hardest_negative(cos.detach(), masked, target)
        return lses, hardest

    def _tiled_block_lses(self, blocks: list[_Block], batch: GlobalBatch) -> tuple[list[Tensor], Tensor]:
        lses, hardest = [], None
        for block in blocks:
            lse, block_hardest = TiledLogSumExp.apply(
                block.anchors, block.columns, self.scale, self.tile_size, self._mask_fn(block, batch)
            )
            lses.append(lse)
            if block.name == "query_to_doc":
                hardest = block_hardest
        return lses, hardest


def _stats(pos_cos: Tensor, hardest: Tensor) -> LossStats:
    has_negative = torch.isfinite(hardest)
    neg_sim = hardest[has_negative].mean() if bool(has_negative.any()) else hardest.new_tensor(float("nan"))
    return LossStats(
        accuracy=(pos_cos > hardest).float().mean(),
        pos_sim=pos_cos.mean(),
        neg_sim=neg_sim,
    )
