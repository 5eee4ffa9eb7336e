"""Model math on the ``xp`` seam: layers (norms, RoPE, MLPs), attention, router."""
from .attention import attention
from .layers import activation, apply_rope, mlp, rmsnorm, rope_tables
from .router import Routing, route

__all__ = ["attention", "activation", "apply_rope", "mlp", "rmsnorm", "rope_tables", "Routing", "route"]
