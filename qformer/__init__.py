"""BLIP-2 Q-Former model library: plain PyTorch, no Lightning, no downloads."""

from qformer.config import Blip2Config, ConfigError, QFormerConfig, VisionConfig, preset
from qformer.qformer import QFormer
from qformer.stage1 import Stage1Model
from qformer.vision import FrozenImageEncoder

__all__ = [
    "Blip2Config",
    "ConfigError",
    "FrozenImageEncoder",
    "QFormer",
    "QFormerConfig",
    "Stage1Model",
    "VisionConfig",
    "preset",
]
