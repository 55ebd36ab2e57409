"""The recipe: one YAML of every stage's settings. schema (the keys) -> values (typed parsing) ->
loader (file + --set) -> checks (validation) -> keys (the generated key table)."""
