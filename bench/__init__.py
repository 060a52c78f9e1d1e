"""Benchmarks of drived against references measured in the same run (issue 4).

`python -m bench --help`; `python -m bench --smoke` runs every group with tiny sizes.
"""
