"""Training: devices and precision, distributed helpers, optimizer and schedule,
checkpoints, metrics, and the loop that ties them together."""
