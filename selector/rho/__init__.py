"""Rho-1 selective language modeling: per-token losses of whole documents, excess loss, top-k% token
masks and document scores."""
