"""Models by path: loading with clear errors, LM chunking and loss, and the training of the proxy and
reference models a method needs."""
