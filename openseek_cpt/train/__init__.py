"""The train stage: HF Trainer under Accelerate (DDP/FSDP), checkpoints that count once marked, resume.

Reading order: stage (run, build_trainer) -> setup (the run plan, resume) -> training_args -> model
(the levers installed) -> trainer -> fsdp -> callbacks/ -> preemption -> teardown.
"""

STAGE = "train"  # the name its logger, output guard and provenance.json use
