"""Shared raster IO: read one image file (any format GDAL opens) into a scaled array, and per-band stretches."""
