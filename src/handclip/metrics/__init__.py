"""Re-identification metrics (CMC Rank-k and mAP) computed without sorting the gallery.

Every query is compared with every gallery item by cosine similarity (the features are
L2-normalised here, then multiplied). A gallery item is a *true match* of a query when it
carries the same identity label. Queries whose identity does not occur in the gallery are
*invalid*: they are left out of every metric and only counted.

Ranking rule: gallery items are ordered by decreasing similarity; among equal similarities
the earlier gallery index comes first. This makes every result deterministic.

How it avoids a sort
--------------------
Only the positions of a query's true matches matter. The 0-based position of match ``m`` of
query ``q`` in the ranked gallery is::

    #{g : sim[q, g] > sim[q, m]}  +  #{g : sim[q, g] == sim[q, m] and g < m}

so each query's similarity row is compared against its (usually few) true-match scores:
``O(n_matches * G)`` cheap comparisons instead of an ``O(G log G)`` sort. Queries are
processed in chunks (sorted by their number of matches so that padding stays small), sized
from a memory budget; a query with very many matches is further split over match slots.
Each match costs two comparison passes over its query's similarity row (``>`` and ``==``,
written as 0/1 floats because float sums are far faster than bool sums on CPU); exact ties
are then resolved by gallery index for the affected (query, match) pairs only. With about
one match per query the whole computation costs roughly 1.5x the similarity product alone;
the extra cost grows linearly with the number of matches per query.

Public functions (one module each)
---------------------------------
* :func:`compute_reid_metrics` (``rank.py``) - the fast, chunked implementation (use this).
* :func:`argsort_reference_metrics` (``reference.py``) - the same signature and results, computed
  with a full stable argsort of every query's similarity row (the classic way); a slow second
  opinion used by tests and as the speed reference in benchmarks.
* :func:`similarity_only` (``similarity.py``) - only the chunked, normalised similarity products,
  with the same default chunking; lets a benchmark time the matrix product alone.
* :func:`~handclip.metrics.scores.identity_scores` (``scores.py``) - every query against every gallery
  identity (an identity scores as its best image): genuine, impostor and non-mated top scores.
* ``verification.py`` - figures from those scores: the threshold at a target false-match rate, TAR at
  FMR, EER, the open-set "unknown" rate and DIR (brute-force references in ``tests/reference.py``).
* :func:`~handclip.metrics.fusion.fuse_scores` (``fusion.py``) - per-hand-type probe x person score matrices
  fused (mean or max) over the hand types both sides have, with the number of hand types used per pair.

This package imports nothing else of HandCLIP: every layer may use it.
"""

from handclip.metrics.inputs import AP_MODES, DEFAULT_MEMORY_BUDGET_BYTES
from handclip.metrics.rank import compute_reid_metrics
from handclip.metrics.reference import argsort_reference_metrics
from handclip.metrics.similarity import similarity_only

__all__ = [
    "AP_MODES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "argsort_reference_metrics",
    "compute_reid_metrics",
    "similarity_only",
]
