"""Identity rankings of the decision modes other than the plain one (best photo, one probe per photo).

A probe is one query photo (``query_mode=each``) or one case of photos (``query_mode=case``). Its score for a
gallery person:

* ``gallery_mode=max``: the best cosine of the probe with the person's photos; ``mean``: the cosine of the probe
  with the person's mean template (:func:`handclip.metrics.templates.mean_templates`, kept in the index);
* for a case, ``case_mode=mean``: the probe is the case's mean template; ``max``: the best score (as above) of
  any of the case's photos.

Every person gets a *best-matching photo*: the gallery photo of that person with the highest cosine with the
probe (with any photo of a case for ``case_mode=max``; the earliest gallery row on ties). It is the photo shown
in the ranking pictures, and it breaks ties in the ranking (the person whose best photo comes first in the
gallery ranks first), the rule of the plain mode (:mod:`handclip.identify.search`). The scores are computed
exactly (products in float64, kept as float32), over the gallery in chunks of bounded memory, probes in blocks.
"""

from __future__ import annotations

import torch

from handclip.identify.search import DEFAULT_CHUNK_BYTES, IdentityHits, _order, chunk_rows
from handclip.metrics.templates import case_templates

_FAR = torch.iinfo(torch.long).max


@torch.inference_mode()
def person_table(probes: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, num_ids: int,
                 rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (P, I) float32, best rows (P, I) long): per probe and person the best cosine with the person's
    photos and the earliest gallery row reaching it; one pass over the gallery, ``rows`` rows at a time.

    Products are taken in float64 and rounded to float32, so that identical photos (and persons made of
    identical photos) get identical scores wherever they sit in the gallery: ties are ties."""
    probes = probes.to(torch.float64)
    labels = labels.to(probes.device)
    num_p, num_g = probes.shape[0], gallery.shape[0]
    rows = min(max(rows or chunk_rows(num_p, 2 * gallery.shape[1]), 1), num_g)
    table = torch.full((num_p, num_ids), float("-inf"), dtype=torch.float32, device=probes.device)
    best = torch.full((num_p, num_ids), _FAR, dtype=torch.long, device=probes.device)
    for start in range(0, num_g, rows):
        block = gallery[start:start + rows].to(device=probes.device, dtype=torch.float64)
        sims = (probes @ block.t()).to(torch.float32)
        cols = labels[start:start + rows].expand_as(sims)
        top = torch.full_like(table, float("-inf")).scatter_reduce_(1, cols, sims, reduce="amax")
        at = torch.arange(start, start + block.shape[0], device=probes.device).expand_as(sims)
        where = torch.full_like(best, _FAR).scatter_reduce_(
            1, cols, torch.where(sims == top.gather(1, cols), at, _FAR), reduce="amin")
        best = torch.where(top > table, where, torch.where(top == table, torch.minimum(best, where), best))
        table = torch.maximum(table, top)
    return table, best


def _probe_blocks(groups: list[list[int]], num_ids: int, budget: int) -> list[list[int]]:
    """Consecutive groups (cases) batched so that the rows of a block's tables stay within ``budget`` bytes."""
    per_block = max(1, budget // (12 * max(num_ids, 1)))
    blocks, current, size = [], [], 0
    for c, group in enumerate(groups):
        if current and size + len(group) > per_block:
            blocks.append(current)
            current, size = [], 0
        current.append(c)
        size += len(group)
    return blocks + ([current] if current else [])


@torch.inference_mode()
def top_k_persons(photos: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, k: int,
                  templates: torch.Tensor | None = None, groups: list[list[int]] | None = None,
                  case_mode: str = "mean", budget: int = DEFAULT_CHUNK_BYTES, rows: int | None = None
                  ) -> IdentityHits:
    """The k best persons of every probe (see the module).

    ``photos`` (N, D): L2-normalised query embeddings; ``gallery`` (G, D) and ``labels`` (G,) as for
    :func:`~handclip.identify.search.top_k_identities` (labels 0..I-1); ``templates`` (I, D): score persons by
    their mean template (None: by their best photo); ``groups``: the photo rows of each case (None: each photo is
    a probe); ``case_mode``: ``mean`` or ``max``; ``budget``: bytes of the score tables of one block of probes;
    ``rows``: gallery rows per chunk (default: from the memory budget of :mod:`~handclip.identify.search`)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_ids = int(labels.max()) + 1
    k = min(int(k), num_ids)
    groups = [[i] for i in range(photos.shape[0])] if groups is None else groups
    out = IdentityHits([], [], [])
    for block in _probe_blocks(groups, num_ids, budget):
        cases = [groups[c] for c in block]
        if case_mode == "mean":
            members = torch.tensor([n for n, g in enumerate(cases) for _ in g], dtype=torch.long)
            probes = case_templates(photos[[i for g in cases for i in g]], members)
            owner = torch.arange(len(cases))
        else:
            probes = photos[[i for g in cases for i in g]]
            owner = torch.tensor([n for n, g in enumerate(cases) for _ in g], dtype=torch.long)
        probes = probes.to(photos.device)
        table, best = person_table(probes, gallery, labels, num_ids, rows)
        scores = table if templates is None else (
            probes.to(torch.float64) @ templates.to(probes.device, torch.float64).t()).to(torch.float32)
        owner = owner.to(probes.device)
        if case_mode == "max":  # the best over each case's photos
            expanded = owner.unsqueeze(1).expand_as(table)
            shape = (len(cases), num_ids)
            case_scores = torch.full(shape, float("-inf"), device=probes.device).scatter_reduce_(
                0, expanded, scores, reduce="amax")
            case_table = torch.full(shape, float("-inf"), device=probes.device).scatter_reduce_(
                0, expanded, table, reduce="amax")
            reaching = torch.where(table == case_table.gather(0, expanded), best, _FAR)
            best = torch.full(shape, _FAR, dtype=torch.long, device=probes.device).scatter_reduce_(
                0, expanded, reaching, reduce="amin")
            scores = case_scores
        ranked_s, ranked_rows = _order(scores, best)
        ranked_s, ranked_rows = ranked_s[:, :k].cpu(), ranked_rows[:, :k].cpu()
        out.labels.extend(labels[ranked_rows].tolist())
        out.scores.extend(ranked_s.tolist())
        out.rows.extend(ranked_rows.tolist())
    return out
