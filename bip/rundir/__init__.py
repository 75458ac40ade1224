"""The run folder on disk: its lease and owner, atomic writes, checkpoints, provenance, the
step-boundary decisions and publication of final.pt + result.json."""
