"""What the student minimises: pure math (losses, weighting), the per-token objective and its shaping."""
