"""The one training loop and what it runs on: backends, micro-batches, optimizer, schedule, checkpoints."""
