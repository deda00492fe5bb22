"""Downstream evaluation: per-task metrics (torchmetrics) and the report (table, ARP, bootstrap, radar)."""
