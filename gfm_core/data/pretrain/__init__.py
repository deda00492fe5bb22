"""Pretraining input: crops streamed from the shards, SimMIM masks, and the frozen teacher's target pool."""
