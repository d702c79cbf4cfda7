"""Identify new hand photos against a gallery of known people, with a calibrated "unknown" decision.

    python -m handclip.identify ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt \
        gallery=DIR query=PHOTO|DIR|'GLOB'

Modules: :mod:`~handclip.identify.sources` (which files a gallery and a query are), :mod:`~.cases` (case
folders, ``query_mode=case``), :mod:`~.images` (decoding and embedding, unreadable files counted), :mod:`~.index`
(the gallery embedded once, reused; its mean templates), :mod:`~.search` (exact chunked top-k), :mod:`~.modes`
(the rankings of mean templates and cases), :mod:`~.results` (decisions, files, printing), :mod:`~.run` (the
steps). Across hand types (``fusion=mean|max``): :mod:`~.fusion` (the steps), :mod:`~.hand_sources` (galleries
and probes by hand type), :mod:`~.fused_threshold`, and the hand-type classifier that routes photos
(:mod:`~.hand_classifier`, trained by :mod:`~.hand_training`: ``task=train_hand_type``).
"""

__all__ = ["identify"]


def __getattr__(name: str):
    # On first use, not on import: `python -m handclip.identify` imports this package before checking its
    # command line, and identify's modules bring torch and open_clip.
    if name == "identify":
        from handclip.identify.run import identify

        return identify
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
