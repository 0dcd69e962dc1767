"""Speed paths: fused and lean layers that compute the same function as the plain modules.

Each module swaps or wraps a piece of a placed model (LoRA linears, q/k/v and gate/up projections,
attention, the MLP, norm casts, whole decoder layers) for one that does less work or holds less
memory, and is tested against the plain module it replaces. `models.device.Placement` applies them.
"""
