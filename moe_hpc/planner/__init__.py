"""``moe-hpc plan``: the deployment (the runner's own role and placement functions), memory per
GPU, the time model and its calibration against bench runs, the DAGs and their verifier, and
the report.

May import: moe, placement, comm, model, files, device, config (it needs no moe today).
Not runtime (sibling).
"""
