# Thin wrapper: every target calls the `openseek-cpt` CLI (or sbatch). `make help` lists them.
PY ?= python3

.PHONY: help test
help:
	@echo "targets: test"

test:
	$(PY) -m pytest -q tests
