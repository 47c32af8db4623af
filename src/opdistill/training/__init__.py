"""The loop: batches, one update, cold start, checkpoints and torch.distributed."""
