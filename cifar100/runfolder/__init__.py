"""The run folder: its lock and history, resuming and forking, checkpoints, file checks and the
metrics, plots, summary and W&B tracking written into it."""
