"""The soup stage: average the base model and a run's checkpoints, key by key, streamed.

Reading order: stage (run) -> config (the `soup:` section) -> inputs -> plan -> methods -> pipeline
-> numerics -> outputs.
"""

STAGE = "soup"  # the name its logger, output guard and provenance.json use
