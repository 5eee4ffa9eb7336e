"""What surrounds a run: the GPU bench, synthetic weights, inputs and traces, the scaling report.

May import: runtime and everything below it.
"""
