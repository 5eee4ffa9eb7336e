"""The MoE layer (``MoeLayer``): its router (gate, counters, balancer, trace), the micro-batch
count and dispatch layout, run-time balancing, tensor parallelism inside experts, composed with
the exchange, the experts and the shared expert into a layer that returns the finished output.

May import: placement, comm, model, files, device, config.
"""
