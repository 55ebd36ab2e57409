"""What every recipe has in common, whatever its sections: schema (declaring a key, the hash, the run
record) -> values (typed parsing) -> loader (file + --set) -> checks (validation) -> keys (the
generated key table). The sections are the stages'; `openseek_cpt/config.py` assembles them."""
