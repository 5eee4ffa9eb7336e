"""HDF5 in and out: input batches, outputs written in place, checkpoints, the bf16 codec, and the
one atomic-write helper every file this project writes goes through.

May import: device, config.
"""
