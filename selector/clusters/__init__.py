"""Document embeddings, k-means clusters with their neighbours, and each cluster's queue in hash order
(Quad's arms; exploration-only walks them too)."""
