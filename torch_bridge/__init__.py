"""torch_bridge: PyTorch tensors and BlockMasks into flexjax (imports torch; nothing imports it)."""

from torch_bridge.block_mask import from_torch_block_mask

__all__ = ["from_torch_block_mask"]
