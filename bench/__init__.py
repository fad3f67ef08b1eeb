"""chatft's benchmarks: driver scripts (``python bench/NAME.py``) and their library
(:mod:`bench.lib`). Not part of the installed package: they run from a checkout."""
