"""Ranks talking: the communicators (``Topology``, made once), the token exchange with its
buffers and handles, its transports (MPI, staged MPI, NCCL), and collective error agreement.

May import: device, config. Not model (a sibling) or files (above).
"""
