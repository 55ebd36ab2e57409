"""Tiny local stand-ins for the hub's model, tokenizer and datasets (tests, `openseek-cpt tiny`)."""
