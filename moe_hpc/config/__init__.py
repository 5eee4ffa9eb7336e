"""What a run is asked to do, validated at the edge: the run config (``[model]``, ``[parallel]``,
``[run]``), the one cluster description, the role formula that splits ranks, and the error types.

The bottom floor: imports nothing of moe_hpc outside this folder.
"""
