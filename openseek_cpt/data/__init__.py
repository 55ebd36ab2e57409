"""The data stage: mix sources by ratio, tokenize, pack or truncate, sample, save as Arrow.

Reading order: stage (run) -> config (the `data:` section) -> sources + readers + rows (what a
source is) -> tokenizer + encoder -> prepare (one source: tokenize and pack) -> packing (the
strategies) -> sample (the mix).
"""

STAGE = "data"  # the name its logger, output guard and provenance.json use
