"""Training: the job config, the loop, checkpoints and metrics."""
