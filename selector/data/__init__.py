"""Data contracts: the corpus and its index, the work dir and its leases, manifests and what reads them,
runs, the refresh lineage, object storage."""
