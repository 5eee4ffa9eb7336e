"""One MoE exchange step: the gate (``Router``, which owns the balancing state and counters),
the dispatch plan, run-time balancing, tensor parallelism inside experts, and the
double-buffered block that composes them with the exchange and the experts.

May import: placement, comm, model, files, device, config.
"""
