"""GTP: trajectory features (projected gradients at several checkpoints) and the sparse non-negative
pursuit (CoSaMP + NNLS) that matches them."""
