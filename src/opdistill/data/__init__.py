"""Examples and where they come from: JSONL / HF datasets sources, streams, built-in tasks, prompt
selection."""
