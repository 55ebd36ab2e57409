"""The export stage: a prepared dataset as Megatron .bin/.idx or MindRecord, for other trainers."""

STAGE = "export"  # the name its logger, output guard and provenance.json use
