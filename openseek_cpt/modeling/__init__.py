"""Model-level training levers, one file each: attention, experts, loss, router precision and
balance, the collator, FLOPs. Shared by train, evaluation, doctor and the benches."""
