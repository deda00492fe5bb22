"""Dagster layer: assets over ``gfm_core.stages``, resources, sensors and the definitions. No ML code here."""
