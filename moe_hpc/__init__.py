"""moe_hpc: offline inference of Mixture-of-Experts transformers over MPI ranks."""
__version__ = "0.1.0"
