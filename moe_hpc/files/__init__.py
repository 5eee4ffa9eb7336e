"""HDF5 in and out: input batches, outputs written in place, checkpoints (read into
``model.weights``' types), the bf16 codec, and the one atomic-write helper every file this
project writes goes through.

May import: model, comm, device, config.
"""
