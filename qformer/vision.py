"""The image encoder: any timm ViT, its last block(s) and final norm dropped; frozen, unless fine-tuned (`trainable`)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor

from qformer.config import VisionConfig
from qformer.files import read_safetensors, read_torch, shape_mismatches
from qformer.frozen import Frozen

# The pixel normalisation EVA-CLIP and CLIP encoders were trained with (BLIP-2 uses it for every image).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint, loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    checkpoint = read_torch(path)
    for key in ("state_dict", "model", "module"):  # common wrappers (LAVIS keeps its weights under "model")
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return checkpoint


class FrozenImageEncoder(Frozen):
    """A timm ViT returning patch tokens (B, N, width) in fp32: in permanent eval mode with no gradients, or, built
    with `trainable=True` (fine-tuning, as BLIP-2's captioning and retrieval recipes), trained with the Q-Former.

    A trainable encoder keeps fp32 weights whatever `precision` says (that is the frozen tower's storage dtype): the
    optimiser updates fp32 master weights, and an autocast (`bf16-mixed`, `16-mixed`) computes in low precision.
    """

    def __init__(self, config: VisionConfig, trainable: bool = False):
        super().__init__(config.precision, "vision_config.precision", cuda_dtype=torch.float16)
        self.config = config
        self.trainable = trainable
        self.model = timm.create_model(
            config.model_name, pretrained=False, num_classes=0, img_size=config.image_size, **config.model_kwargs
        )
        if config.weights_path is not None:
            self._load_weights(config.weights_path)
        depth = len(self.model.blocks)
        if not 0 <= config.drop_last_blocks < depth:
            raise ValueError(f"vision_config.drop_last_blocks must be in [0, {depth}), got {config.drop_last_blocks}")
        # timm's own pruning: keep blocks up to the last one we use, drop the final norm and head.
        self.model.prune_intermediate_layers(indices=[depth - 1 - config.drop_last_blocks], prune_norm=True)
        if trainable:
            self.model.float()
        else:
            self.freeze()

    def use_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's own checkpointing of `blocks`)."""
        self.model.set_grad_checkpointing(enabled)

    @property
    def width(self) -> int:
        return self.model.embed_dim

    def _load_weights(self, path: str) -> None:
        state = load_state_dict_file(path)
        filter_fn = getattr(__import__(type(self.model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm converts original (e.g. EVA / OpenAI CLIP) key names itself
            state = filter_fn(state, self.model)
        wrong = shape_mismatches(self.model.state_dict(), state)
        if wrong:
            raise ValueError(f"{path} does not fit timm model {self.config.model_name!r}: {len(wrong)} tensor(s) of another shape: {'; '.join(wrong[:3])}")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # The head, final norms and dropped blocks are removed right after loading: their keys do not matter.
        depth = len(self.model.blocks)
        dropped = tuple(f"blocks.{i}." for i in range(depth - self.config.drop_last_blocks, depth))
        unused = ("head.", "fc_norm.", "norm.", "attn_pool.", *dropped)
        missing = [k for k in missing if not k.startswith(unused)]
        unexpected = [k for k in unexpected if not k.startswith(unused)]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit timm model {self.config.model_name!r}: "
                f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )

    def forward(self, images: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) -> patch tokens (B, N, width) in fp32.

        Tokens this encoder computed earlier (B, N, width), read from a feature cache, pass through as fp32:
        every model and loss takes either, so training and evaluation from a cache need no other path.
        """
        if images.ndim == 3:
            if self.trainable and self.training:
                raise ValueError("cached image features cannot train the image encoder: read the images instead")
            if images.shape[-1] != self.width:
                raise ValueError(f"cached image features are {images.shape[-1]} wide, the image encoder {self.width}")
            return images.float()
        if self.trainable:
            return self.model.forward_features(images).float()  # fp32 weights; an enclosing autocast picks the compute dtype
        with torch.no_grad():
            dtype = self.compute_dtype(images.device)
            return self.model.forward_features(images.to(dtype)).float()
