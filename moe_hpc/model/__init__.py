"""The math of the model on the ``xp`` seam: norms, RoPE, attention, the router, the experts a
rank hosts, FLOP counts, and the float64 reference every parallel layout is checked against.

May import: device, config. Not comm or files (siblings).
"""
