"""Identity-level comparison scores: every query against every gallery identity, an identity scoring as its
best image. The genuine and impostor scores that verification figures and the open-set threshold come from.

For query ``q`` and gallery identity ``i``, ``score(q, i) = max over the gallery images g of i of cos(q, g)``
(features L2-normalised here). Then:

* a *genuine* score is ``score(q, own identity of q)``, for every query whose identity is in the gallery;
* an *impostor* score is ``score(q, i)`` for every other identity ``i``;
* the *non-mated top score* of ``q`` is its best impostor score: the score its top answer would have if its
  own identity were withheld from the gallery (the open-set protocol);
* a query is *identified* when its genuine score is strictly above its non-mated top score (a tie with
  another identity counts as not identified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handclip.metrics import inputs
from handclip.metrics.inputs import check_chunk_size, prepare_inputs


@dataclass(frozen=True)
class IdentityScores:
    """Scores of ``Q`` queries against ``I`` gallery identities (float32 tensors on the features' device)."""

    table: torch.Tensor
    """(Q, I): best-image score of each query for each gallery identity."""
    identities: torch.Tensor
    """(I,): the gallery identity labels, ascending (column order of ``table``)."""
    own: torch.Tensor
    """(Q,): column of each query's own identity, -1 when its identity is not in the gallery."""

    @property
    def mated(self) -> torch.Tensor:
        """(Q,) bool: the query's identity is in the gallery."""
        return self.own >= 0

    def genuine(self) -> torch.Tensor:
        """Genuine scores, one per mated query (in query order)."""
        rows = torch.nonzero(self.mated).flatten()
        return self.table[rows, self.own[rows]]

    def _impostor_mask(self) -> torch.Tensor:
        mask = torch.ones_like(self.table, dtype=torch.bool)
        rows = torch.nonzero(self.mated).flatten()
        mask[rows, self.own[rows]] = False
        return mask

    def impostor(self) -> torch.Tensor:
        """Every impostor score, flattened (row by row)."""
        return self.table[self._impostor_mask()]

    def nonmated_top(self) -> torch.Tensor:
        """(Q,): each query's best score among the identities other than its own (-inf with none)."""
        masked = self.table.masked_fill(~self._impostor_mask(), float("-inf"))
        return masked.max(dim=1).values

    def identified(self) -> torch.Tensor:
        """(Q,) bool: a mated query whose own identity scores strictly above every other identity."""
        out = torch.zeros_like(self.mated)
        rows = torch.nonzero(self.mated).flatten()
        out[rows] = self.table[rows, self.own[rows]] > self.nonmated_top()[rows]
        return out


def identity_scores(query_features, query_labels, gallery_features, gallery_labels,
                    chunk_size: int | None = None) -> IdentityScores:
    """Best-image cosine score of every query for every gallery identity, chunked over queries.

    Args are as for :func:`handclip.metrics.compute_reid_metrics` (features are L2-normalised here);
    ``chunk_size`` bounds the queries per similarity block (default: from the memory budget).
    """
    chunk_size = check_chunk_size(chunk_size)
    qn, ql, gn, gl = prepare_inputs(query_features, query_labels, gallery_features, gallery_labels)
    # "no mutate": equivalent mutants (defaults on the CPU, the split of work); see metrics/rank.py
    identities, column = torch.unique(gl, sorted=True, return_inverse=True)  # pragma: no mutate
    num_q, num_g, num_i = qn.shape[0], gn.shape[0], identities.numel()
    if chunk_size is None:
        chunk_size = max(1, inputs.DEFAULT_MEMORY_BUDGET_BYTES // (4 * (num_g + num_i)))  # pragma: no mutate
    table = torch.empty((num_q, num_i), dtype=torch.float32, device=qn.device)  # pragma: no mutate
    for i in range(0, num_q, chunk_size):
        sim = qn[i:i + chunk_size] @ gn.t()
        block = torch.full((sim.shape[0], num_i), float("-inf"),
                           dtype=torch.float32, device=qn.device)  # pragma: no mutate
        table[i:i + chunk_size] = block.scatter_reduce_(1, column.expand_as(sim), sim, reduce="amax")
    pos = torch.searchsorted(identities, ql).clamp_max(num_i - 1)  # the gallery is never empty here
    own = torch.where(identities[pos] == ql, pos, torch.full_like(pos, -1))
    return IdentityScores(table=table, identities=identities, own=own)
