"""Score fusion across hand types: one probe-by-gallery-person score matrix per hand type, fused into one.

A person may be enrolled (gallery side) and a probe may be taken (probe side) with photos of several hand
types, each hand type scored by its own model. For probe ``p`` and gallery person ``g`` the hand types
*used* are those both sides have::

    used(p, g) = {h : probe_has[h, p] and gallery_has[h, g]}
    count(p, g) = |used(p, g)|

and the fused score is, over the used hand types only,

* ``fusion="mean"``: ``sum_{h in used} scores[h, p, g] / count(p, g)``;
* ``fusion="max"``: ``max_{h in used} scores[h, p, g]``.

A pair with **no common hand type** (``count == 0``) has no score: its fused score is ``-inf`` (it ranks
below every real score and is never accepted by any finite threshold) and its count is 0, so a caller
can leave such pairs out (``count > 0``) of rankings and verification figures. Entries of ``scores``
whose hand type is missing on either side are never read (they may hold anything, NaN included).

Shapes: ``H`` hand types, ``P`` probes, ``G`` gallery persons. The hand types may also be given as a
mapping ``{hand type: matrix}`` with masks as mappings with the same keys (any order).

This module imports nothing else of HandCLIP (base layer): identify, eval and calibration all use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: Accepted values of ``fusion``.
FUSIONS = ("mean", "max")


@dataclass(frozen=True)
class FusedScores:
    """Fused scores of ``P`` probes against ``G`` gallery persons (tensors on the scores' device)."""

    scores: torch.Tensor
    """(P, G) floating: the fused score; ``-inf`` where the pair has no common hand type."""
    count: torch.Tensor
    """(P, G) int64: the number of hand types fused for the pair (0 to H)."""

    @property
    def scored(self) -> torch.Tensor:
        """(P, G) bool: the pair has at least one common hand type (``count > 0``)."""
        return self.count > 0


def check_fusion(fusion: str) -> str:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    return fusion


def _stack(x, name: str, keys: list | None) -> torch.Tensor:
    if isinstance(x, Mapping):
        if keys is None or set(x) != set(keys):
            raise ValueError(f"{name} must be a mapping with the same hand types as the scores ({keys})")
        x = [x[k] for k in keys]
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: no hand types given")
        return torch.stack([torch.as_tensor(v) for v in x])
    return torch.as_tensor(x)


def fuse_scores(scores, probe_has, gallery_has, fusion: str = "mean") -> FusedScores:
    """Fuse per-hand-type scores over the hand types both sides have (see the module docstring).

    Args:
        scores: (H, P, G) tensor/array, a sequence of H (P, G) matrices, or a mapping hand type -> (P, G).
        probe_has: (H, P) bool (or a sequence / mapping of (P,) bools): probe p has hand type h.
        gallery_has: (H, G) bool (or a sequence / mapping of (G,) bools): gallery person g has hand type h.
        fusion: ``"mean"`` or ``"max"``.

    Returns:
        :class:`FusedScores` (``scores`` in the input's floating dtype, float32 for integer input).

    Raises:
        ValueError: an unknown ``fusion``, or shapes that do not agree.
    """
    fusion = check_fusion(fusion)
    keys = list(scores) if isinstance(scores, Mapping) else None
    s = _stack(scores, "scores", keys)
    if not s.dtype.is_floating_point:
        s = s.float()
    pm = _stack(probe_has, "probe_has", keys).to(device=s.device, dtype=torch.bool)
    gm = _stack(gallery_has, "gallery_has", keys).to(device=s.device, dtype=torch.bool)
    if s.dim() != 3:
        raise ValueError(f"scores must be (hand types, probes, gallery); got shape {tuple(s.shape)}")
    h, p, g = s.shape
    if pm.shape != (h, p) or gm.shape != (h, g):
        raise ValueError(f"masks must be (hand types, probes) = {(h, p)} and (hand types, gallery) = {(h, g)}; "
                         f"got {tuple(pm.shape)} and {tuple(gm.shape)}")
    used = pm.unsqueeze(2) & gm.unsqueeze(1)  # (H, P, G)
    count = used.sum(dim=0)
    if fusion == "mean":
        total = torch.where(used, s, torch.zeros((), dtype=s.dtype, device=s.device)).sum(dim=0)
        fused = total / count.clamp_min(1).to(s.dtype)
    else:
        fused = torch.where(used, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device)).amax(dim=0)
    fused = fused.masked_fill(count == 0, float("-inf"))
    return FusedScores(scores=fused, count=count)
