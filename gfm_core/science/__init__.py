"""The paper's claims tested at small scale on real data: pretraining variants, dense probes, statistics.

:mod:`~gfm_core.science.experiment` runs it (``gfm science`` / ``make science``), :mod:`~gfm_core.science.probes`
scores frozen encoders, :mod:`~gfm_core.science.stats` holds the statistics fixed in advance and
:mod:`~gfm_core.science.report` writes the verdicts.
"""
