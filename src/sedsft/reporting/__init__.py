"""Tables and figures of pipeline grids from their run records (``src/plots.py``)."""
