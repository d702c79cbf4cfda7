"""Speed and memory benchmark of HandCLIP's data loading, training step and evaluation.

    python -m handclip.bench                      # full run -> benchmarks/results/<device>.json
    python -m handclip.bench bench.quick=true     # seconds -> benchmarks/results/<device>-quick.json
    python -m handclip.bench bench.device=cpu bench.parts=[eval]

Every figure is a median over repeats after warm-up, and every goal is a ratio of two figures measured
in the same run on the same machine:

* ``data.cached_speedup``: images/s of one epoch served from the decode-once crop cache
  (:class:`TensorImageDataset` over :func:`cached_crops`) / images/s decoding the JPEGs on the fly
  (:class:`ImageDataset` through a DataLoader), same batch size, on synthetic 1600x1200 photos.
* ``train.vs_bare_loop``: images/s of :class:`HandCLIPModule`'s training step run by a Lightning
  Trainer / the same step (forward, cross-entropy, backward, AdamW) in a bare PyTorch loop over the
  same module's parameters and the same optimizer.
* ``eval.metrics_vs_matmul_<N>``: time of :func:`compute_reid_metrics` / time of the similarity
  product alone (:func:`similarity_only`) at N x N.
* ``eval.speedup_vs_argsort_<N>``: time of :func:`argsort_reference_metrics` / time of
  :func:`compute_reid_metrics` at N x N.
* ``search.queries_per_s``, ``search.peak_mem_vs_index``, ``search.reuse_*``: exact top-k identity search
  of a batch of queries against a 1M x 512 index, and reopening an unchanged gallery index
  (:mod:`handclip.bench.search`).
* ``inference.best_vs_torch_b64``, ``inference.best_latency_b1_p50_ms``, ``inference.identify_photos_per_s``: the
  CPU inference backends against PyTorch eager fp32 (:mod:`handclip.bench.inference`; ``bench.parts=[inference]``).
* ``app.load.all_right``, ``app.race.consistent_and_seen``: HandCLIP Studio served by ``python -m handclip.app`` on a
  loopback port under 20 concurrent clients (every answer its own photo's; p50/p95 latency recorded) and identify
  during enrolments (never a half-enrolled person) (:mod:`handclip.bench.app`; ``bench.parts=[app]``).
* ``checkpoints.run_share``: seconds a default-recipe run on 11k-sized synthetic data spends writing checkpoints
  (on the training thread) / its wall time (:mod:`handclip.bench.checkpoints`).

Peak host RSS (reset per block through ``/proc/self/clear_refs`` where Linux allows it) and peak GPU
memory are recorded for every measured block.
"""

# This package imports nothing: `python -m handclip.bench --help` and a mistyped option are answered before torch
# loads. The run is handclip.bench.run (run_benchmark), one module per part beside it.
