"""Demo and test data: real CPython text, synthetic low-quality text, the demo corpus, and tiny real
models built offline."""
