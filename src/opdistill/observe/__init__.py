"""What a run shows: diagnostics (pure), alarms, evaluation, logs, the progress bar and the report."""
