"""Reference training recipes and the small engine they share (loop, checkpoints, logging, DDP)."""
