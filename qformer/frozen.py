"""What the frozen towers (image encoder, language model) share: eval forever, no gradients, a storage precision."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Frozen(nn.Module):
    """Subclasses put their weights in `self.model` and call `self.freeze()` once built.

    `precision="auto"` keeps fp32 on CPU and casts to `cuda_dtype` the first time the tower runs on CUDA.
    """

    def __init__(self, precision: str, field: str, cuda_dtype: torch.dtype = torch.float16):
        super().__init__()
        if precision not in (*DTYPES, "auto"):
            raise ValueError(f"{field} must be auto, fp32, fp16 or bf16, got {precision!r}")
        self.precision = precision
        self.cuda_dtype = cuda_dtype

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        if self.precision != "auto":
            self.model.to(DTYPES[self.precision])

    def train(self, mode: bool = True) -> "Frozen":
        """Frozen means frozen: dropout and drop-path stay off whatever the parent module does."""
        return super().train(False)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype to run in on `device`, casting the weights once if "auto" asks for another."""
        if self.precision == "auto":
            dtype = self.cuda_dtype if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[self.precision]
        if next(self.model.parameters()).dtype != dtype:
            self.model.to(dtype)
        return dtype
