"""The contract between stages: what one stage writes and the next reads, on disk.

temps (the one temp-name helper, sweeping) -> fileio (fsync, atomic json) -> atomic (atomic output
directories, the ownership guard) -> provenance (hashes, provenance.json, verify) -> sidecar (the
provenance of an output that is files) -> checkpoints + run_lock (the checkpoint lifecycle) ->
prepared (the prepared dataset) -> safetensors_stream / safetensors_writer (weights, streamed) ->
megatron_format (.bin/.idx).
"""
