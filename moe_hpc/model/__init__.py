"""The math of the model on the ``xp`` seam: typed weights and the block objects that hold them,
norms, RoPE, attention, the gate, the experts a rank hosts, FLOP counts, and the float64
reference every parallel layout is checked against.

May import: device, config. Not comm (a sibling) or files (above).
"""
