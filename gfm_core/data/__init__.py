"""Data for the pipeline: raster IO, GeoPile ingestion, pretraining input, downstream task datasets."""
