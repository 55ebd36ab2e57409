"""The train stage's Trainer callbacks, one per file (preemption's is in `train.preemption`)."""
