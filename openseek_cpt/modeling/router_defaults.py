"""router_balance.py's defaults (a leaf: the recipe reads them without torch)."""

# DeepSeek-V3 (bias update speed 0.001) and Megatron's moe_router_bias_update_rate default.
DEFAULT_RATE = 1e-3
