"""Where experts live: the placement value and its formulas, placement files, routing traces,
the one link model, the EPLB-style greedy baseline and the topology-aware optimiser.

May import: comm, model, files, device, config (it uses files and config today).
"""
