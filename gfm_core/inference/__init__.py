"""Apply a backbone or a task model to whole scenes: tiled prediction to GeoTIFF, per-tile embeddings to GeoParquet.

Modules: :mod:`~gfm_core.inference.tiles` (the tiling plan and blending weight), :mod:`~gfm_core.inference.bands`
(the band contract), :mod:`~gfm_core.inference.scene` (windowed reads), :mod:`~gfm_core.inference.runner`
(device, precision, batches), :mod:`~gfm_core.inference.writer` (row-block blending writer),
:mod:`~gfm_core.inference.predict`, :mod:`~gfm_core.inference.embed` (+ :mod:`~gfm_core.inference.embed_raster`,
one pixel per tile), :mod:`~gfm_core.inference.geoparquet` (WKB and ``geo`` metadata by hand),
:mod:`~gfm_core.inference.source` (an exported file or a registry URI), :mod:`~gfm_core.inference.finetuned`
(a fine-tuning run's task model), :mod:`~gfm_core.inference.similar` (nearest tiles by cosine),
:mod:`~gfm_core.inference.gallery` (them as a PNG grid) and :mod:`~gfm_core.inference.commands` (``gfm embed``,
``gfm predict``, ``gfm similar``).
Nothing here imports dagster; memory stays flat in the scene's size (each module says how). The package
re-exports nothing, so that ``gfm --help`` (:mod:`~gfm_core.inference.commands`) does not import torch.
"""
