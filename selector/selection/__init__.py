"""Ranked selection under a token budget (best-first fill from per-shard sorted runs) and the
baselines Quad is measured against."""
