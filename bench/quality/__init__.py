"""Quality benchmark: does a selection make a better model? (``python -m bench.quality --help``)"""
