"""The CI gate: the checkpoint scan, the rules, init-scale evidence and baselines. Never prints."""
