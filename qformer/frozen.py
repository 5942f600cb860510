"""What the frozen towers (image encoder, language model) share: eval forever, no gradients, a storage precision."""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_autocast_dtype() -> torch.dtype:
    """bf16 inside a CPU bf16 autocast (Lightning's bf16-mixed on a CPU), fp32 otherwise."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


class Frozen(nn.Module):
    """Subclasses put their weights in `self.model` and call `self.freeze()` once built.

    `precision="auto"` casts to `cuda_dtype` the first time the tower runs on CUDA; on a CPU it runs in bf16
    under a bf16 autocast (`--trainer.precision bf16-mixed`: CPUs with native bf16 multiply ~4x faster) and in
    fp32 otherwise. A frozen tower is never trained nor saved in a checkpoint, so it needs no fp32 master copy.

    A subclass may let a tower train (`trainable = True`, the image encoder when fine-tuned): then it follows its
    parent's train/eval mode and is never frozen nor cast.
    """

    trainable = False

    def __init__(self, precision: str, field: str, cuda_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.set_precision(precision, field)
        self.cuda_dtype = cuda_dtype

    def set_precision(self, precision: str, field: str = "precision") -> None:
        """Run in `precision` (auto, fp32, fp16 or bf16) from now on: the weights are cast the next time the tower runs."""
        if precision not in (*DTYPES, "auto"):
            raise ValueError(f"{field} must be auto, fp32, fp16 or bf16, got {precision!r}")
        self.precision = precision

    @property
    def weight_precision(self) -> str:
        """fp32, fp16 or bf16: what the weights are stored in now, hence what the tower last ran in ("auto" resolved)."""
        dtype = next(self.model.parameters()).dtype
        return next(name for name, stored in DTYPES.items() if stored == dtype)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        if self.precision != "auto":
            self.cast(DTYPES[self.precision])

    def cast(self, dtype: torch.dtype) -> None:
        """Store the frozen weights in `dtype` (a subclass keeps trainable parts, such as a LoRA adapter, as they are)."""
        self.model.to(dtype)

    def train(self, mode: bool = True) -> "Frozen":
        """Frozen means frozen: dropout and drop-path stay off whatever the parent module does."""
        return super().train(mode and self.trainable)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype to run in on `device`, casting the weights once if "auto" asks for another."""
        if self.precision == "auto":
            dtype = self.cuda_dtype if device.type == "cuda" else cpu_autocast_dtype()
        else:
            dtype = DTYPES[self.precision]
        if next(self.model.parameters()).dtype != dtype:
            self.cast(dtype)
        return dtype
