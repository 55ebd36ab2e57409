"""The train stage: HF Trainer under Accelerate (DDP/FSDP), checkpoints that count once marked, resume.

Reading order: stage (run, build_trainer) -> config (the section, every train.args policy) -> setup
(the run plan, resume) -> model (the levers installed) -> trainer -> fsdp -> callbacks/ -> preemption
-> teardown.
"""

STAGE = "train"  # the name its logger, output guard and provenance.json use
