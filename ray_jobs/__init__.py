"""Job entrypoints: ``python -m ray_jobs.<job> --config CONFIG`` (also what ``ray job submit`` runs)."""
