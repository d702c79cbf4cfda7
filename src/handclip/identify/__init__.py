"""Identify new hand photos against a gallery of known people, with a calibrated "unknown" decision.

    python -m handclip.identify ckpt_path=outputs/train/dorsal_right/checkpoints/best.ckpt \
        gallery=DIR query=PHOTO|DIR|'GLOB'

Modules: :mod:`~handclip.identify.sources` (which files a gallery and a query are), :mod:`~.images`
(decoding and embedding, unreadable files counted), :mod:`~.index` (the gallery embedded once, reused),
:mod:`~.search` (exact chunked top-k), :mod:`~.results` (decisions, files, printing), :mod:`~.run` (the steps).
"""

from handclip.identify.run import identify

__all__ = ["identify"]
