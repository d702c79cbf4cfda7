"""k-reciprocal re-ranking at the protocols' sizes (issue 21's goals): seconds and peak memory of
:func:`handclip.metrics.rerank.k_reciprocal_distances` for N = queries + gallery, against the straightforward dense
implementation (N x N float32 distances, a full argsort, a dense V, a Python loop per row, as published) at
``compare_size``, whose rankings must be the same.

Features are clustered like re-ID embeddings (identities of ``per_identity`` photos around random centres), half
of them queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from handclip.bench.measure import PeakMemory
from handclip.bench.report import size_label
from handclip.metrics.rerank import k_reciprocal_distances

Say = Callable[[str], None]


def clustered(n: int, dim: int, per_identity: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // per_identity), dim, generator=generator)
    ids = torch.randint(0, len(centres), (n,), generator=generator)
    return centres[ids] + 0.9 * torch.randn(n, dim, generator=generator)


def straightforward(qf: np.ndarray, gf: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The dense implementation, row by row (16 bytes x N^2 of memory)."""
    x = np.concatenate([qf, gf])  # float32 as published; float64 for an exact comparison
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, q = len(x), len(qf)
    d = np.maximum(2 - 2 * x @ x.T, 0)
    d /= d.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")
    v = np.zeros((n, n), dtype=x.dtype)
    half = int(round(k1 / 2))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        return forward[(rank[forward, :k + 1] == i).any(axis=1)]

    for i in range(n):
        r = reciprocal(i, k1)
        expansion = r
        for c in r:
            rc = reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        weight = np.exp(-d[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    columns = [np.nonzero(v[:, k])[0] for k in range(n)]
    jaccard = np.zeros((q, n), dtype=x.dtype)
    for i in range(q):
        shared = np.zeros(n, dtype=x.dtype)
        for k in np.nonzero(v[i])[0]:
            rows = columns[k]
            shared[rows] += np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - shared / (2 - shared)
    return (jaccard * (1 - lam) + d[:q] * lam)[:, q:]


def _ranking(dist: np.ndarray) -> np.ndarray:
    return np.argsort(dist, axis=1, kind="stable")


def bench_rerank(s: dict, device: torch.device, seed: int, say: Say) -> tuple[dict, dict]:
    k1, k2, lam = int(s["k1"]), int(s["k2"]), float(s["lambda_value"])
    result: dict = {"k1": k1, "k2": k2, "lambda": lam, "dim": int(s["dim"]), "sizes": {}}
    memory: dict = {}
    for n in [int(v) for v in s["sizes"]]:
        x = clustered(n, int(s["dim"]), int(s["per_identity"]), seed).to(device)
        q = n // 2
        times = []
        with PeakMemory(device) as peak:
            for _ in range(int(s["repeats"])):
                start = time.perf_counter()
                k_reciprocal_distances(x[:q], x[q:], k1, k2, lam)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        label = size_label(n)
        peak_gib = round(peak.result["peak_rss_mb"] / 1024, 2)
        result["sizes"][label] = {"n": n, "seconds": round(seconds, 3), "peak_rss_gib": peak_gib,
                                  "dense_v_gib": round(16 * n * n / 2**30, 2)}
        memory[label] = peak.result
        say(f"  N = {n:,}: {seconds:.2f} s, peak host memory {peak_gib:.2f} GiB")
        if n == int(s["compare_size"]):
            qf, gf = x[:q].cpu().numpy(), x[q:].cpu().numpy()
            start = time.perf_counter()
            slow = straightforward(qf, gf, k1, k2, lam)
            slow_s = time.perf_counter() - start
            exact = k_reciprocal_distances(x[:q].double(), x[q:].double(), k1, k2, lam, dtype=torch.float64)
            fast32 = k_reciprocal_distances(x[:q], x[q:], k1, k2, lam).cpu().numpy()
            same = (_ranking(exact.cpu().numpy()) == _ranking(straightforward(qf.astype(np.float64),
                                                                             gf.astype(np.float64), k1, k2, lam)))
            result["vs_straightforward"] = {
                "n": n, "straightforward_s": round(slow_s, 2), "speedup": round(slow_s / seconds, 1),
                "float64_rankings_equal": bool(same.all()),
                "float32_max_abs_diff": float(np.abs(fast32 - slow).max()),
                "float32_rows_same_top1": float((_ranking(fast32)[:, 0] == _ranking(slow)[:, 0]).mean()),
            }
            say(f"  straightforward at N = {n:,}: {slow_s:.1f} s ({slow_s / seconds:.1f}x slower), rankings equal "
                f"in float64: {bool(same.all())}")
    return result, memory
