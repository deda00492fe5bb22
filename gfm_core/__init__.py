"""gfm_core: the ML library of gfm-pipeline (GFM continual pretraining, ICCV 2023). Never imports dagster.

Entry points: :mod:`gfm_core.config` (``load_params``), :mod:`gfm_core.stages` (one function per pipeline stage,
shared by the ``gfm`` CLI, the Dagster assets and the DVC stages). Heavy libraries load lazily.
"""

__version__ = "0.1.0"
