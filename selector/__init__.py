"""Thresher's selection library: data contracts and the math of each method.

Nothing in this package imports Ray; every function is deterministic given a seed.
"""

__version__ = "0.1.0"
