"""Checks and shared pieces of the re-ID metrics: input validation, normalisation, chunk sizing, results."""

from __future__ import annotations

import numpy as np
import torch

#: Accepted values of the ``ap`` argument.
#: ``"standard"``: AP = mean of precision@k over the positions k of the true matches
#: (torchreid / Market-1501 "standard" definition).
#: ``"trapezoid"``: the older rule of layumi's Market-1501 evaluation code, which averages
#: the precision just before and at each true match.
AP_MODES = ("standard", "trapezoid")

#: Rough bound on the temporary memory (bytes) that one chunk may use when ``chunk_size`` is
#: not given (read at call time, so it can be changed for a whole process).
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Bytes of scratch per (query, gallery) similarity entry and per (query, match, gallery)
# comparison entry (a float32 0/1 indicator).
SIM_BYTES = 4
CMP_BYTES = 4


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} could not be converted to a tensor: {err}") from None


def prepare_features(x, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_items, dim); got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {t.dtype}")
    return t


def _prepare_labels(x, name: str, expected_len: int, device: torch.device) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    # (an empty list converts to float32: accept it, there is nothing to misread)
    if t.numel() and (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer identity labels; got dtype {t.dtype}")
    if t.numel() != expected_len:
        raise ValueError(
            f"{name} has {t.numel()} entries but its features have {expected_len} rows"
        )
    return t.to(device=device, dtype=torch.int64)


def check_ranks(ranks) -> tuple[int, ...]:
    if isinstance(ranks, (int, np.integer)):
        ranks = (ranks,)
    out = []
    for k in ranks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ranks must be positive integers; got {ranks!r}")
        out.append(int(k))
    if not out:
        raise ValueError("ranks must contain at least one positive integer")
    return tuple(out)


def check_ap(ap) -> str:
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {', '.join(repr(m) for m in AP_MODES)}; got {ap!r}")
    return ap


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    return int(chunk_size)


def prepare_pair(query_features, gallery_features) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, convert and L2-normalise query and gallery features (one device, one width)."""
    qf = prepare_features(query_features, "query_features")
    gf = prepare_features(gallery_features, "gallery_features")
    if qf.device != gf.device:
        raise ValueError(
            f"query_features and gallery_features are on different devices ({qf.device} vs {gf.device})"
        )
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"feature dimensions differ: query_features has {qf.shape[1]}, "
            f"gallery_features has {gf.shape[1]}"
        )
    if gf.shape[0] == 0:
        raise ValueError("the gallery is empty (gallery_features has 0 rows)")
    if gf.shape[1] == 0:
        raise ValueError("features have dimension 0")
    return normalize(qf, "query_features"), normalize(gf, "gallery_features")


def prepare_inputs(query_features, query_labels, gallery_features, gallery_labels):
    """Validate, convert and L2-normalise. Returns (qn, ql, gn, gl), all on one device."""
    qn, gn = prepare_pair(query_features, gallery_features)
    ql = _prepare_labels(query_labels, "query_labels", qn.shape[0], qn.device)
    gl = _prepare_labels(gallery_labels, "gallery_labels", gn.shape[0], gn.device)
    return qn, ql, gn, gl


def normalize(t: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (all-zero rows stay zero, like F.normalize)."""
    t = t.detach().to(torch.float32)
    norms = torch.linalg.vector_norm(t, ord=2, dim=1, keepdim=True)
    # A NaN/inf entry makes its row norm non-finite: the check costs no extra pass.
    if norms.numel() and not bool(torch.isfinite(norms).all()):
        raise ValueError(
            f"{name} contains NaN or infinite values (or values so large that the norm overflows)"
        )
    return t / norms.clamp_min(1e-12)


def acc_dtype(device: torch.device) -> torch.dtype:
    # float64 for the (small) per-query AP arithmetic, except where the backend lacks it.
    return torch.float32 if device.type == "mps" else torch.float64


def default_rows(num_gallery: int, max_matches: int) -> int:
    """Queries per chunk so that similarities plus comparison scratch fit in the budget."""
    budget = DEFAULT_MEMORY_BUDGET_BYTES
    cmp_bytes = CMP_BYTES * (2 if num_gallery >= 2**24 else 1)
    per_query = num_gallery * (SIM_BYTES + cmp_bytes * max(1, max_matches))
    return max(1, budget // per_query)


def scratch(buf: torch.Tensor | None, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat scratch tensor of at least ``numel`` elements, reusing ``buf`` when big enough."""
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
    return buf


def finish(num_queries: int, num_valid: int, ranks, hit_sums, ap_sum) -> dict:
    if num_queries == 0:
        raise ValueError("no valid query: the query set is empty")
    if num_valid == 0:
        raise ValueError(
            f"no valid query: none of the {num_queries} query identities has a true match "
            "in the gallery, so Rank-k and mAP are undefined"
        )
    result = {}
    for k, s in zip(ranks, hit_sums):
        result[f"rank{k}"] = float(s) / num_valid
    result["mAP"] = float(ap_sum) / num_valid
    result["num_valid_queries"] = int(num_valid)
    result["num_queries"] = int(num_queries)
    result["num_invalid_queries"] = int(num_queries - num_valid)
    return result
