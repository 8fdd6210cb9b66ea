"""Floor 1: pure-PyTorch quantization numerics (no mmengine / mmpretrain)."""
