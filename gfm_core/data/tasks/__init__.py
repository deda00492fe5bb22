"""Downstream task datasets read from local folders, in the layouts users already have."""
