"""Training: the loop that runs a method's stages, batching, checkpoints and logs."""
