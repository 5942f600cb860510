"""The image encoder: any timm ViT, its last block(s) and final norm dropped; frozen, unless fine-tuned (`trainable`).

An encoder made for one image size runs at another (BLIP-2's fine-tuning: 224 -> 364 px) once its absolute
position embeddings are resampled to the new patch grid (`resize`), as timm and LAVIS do it.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import timm
import torch
from torch import Tensor

from qformer.config import VisionConfig
from qformer.files import read_safetensors, read_torch, shape_mismatches
from qformer.frozen import Frozen

log = logging.getLogger(__name__)

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


# LAVIS's `interpolate_pos_embed` (224 -> 364 px) is bicubic without antialiasing; timm's default antialiases, which
# differs even when upsampling. Both the in-place resize and loading a weights file of another size use LAVIS's choice.
RESAMPLE = {"interpolation": "bicubic", "antialias": False}


def resample_position_embeddings(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                                 num_prefix_tokens: int) -> Tensor:
    """(1, prefix + old grid, width) -> (1, prefix + new grid, width): timm's resampling; the CLS (prefix) tokens kept."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens, **RESAMPLE)


def resize_problem(model: torch.nn.Module, image_size: int) -> str | None:
    """Why the timm model cannot run at `image_size` (None when it can)."""
    patch_embed = getattr(model, "patch_embed", None)
    if not hasattr(model, "set_input_size") or not hasattr(patch_embed, "set_input_size"):
        return f"timm model {type(model).__name__} cannot change its input size (it has no set_input_size)"
    patch = patch_embed.patch_size[0]
    if image_size % patch:
        lower = max(patch, image_size // patch * patch)
        return f"must be a multiple of the image encoder's patch size {patch} (e.g. {lower} or {lower + patch})"
    return None


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

    def resize(self, image_size: int, option: str = "vision_config.image_size") -> None:
        """Run at `image_size` px from now on: the position embeddings are resampled to the new patch grid (see RESAMPLE).

        A size the encoder cannot take is refused in one line naming `option`.
        """
        if image_size == self.config.image_size:
            return
        problem = resize_problem(self.model, image_size)
        if problem:
            raise ValueError(f"{option} {image_size}: the image encoder ({self.config.model_name}, made for "
                             f"{self.config.image_size} px) {problem}")
        old_grid = tuple(self.model.patch_embed.grid_size)
        old_pos_embed = getattr(self.model, "pos_embed", None)
        self.model.set_input_size(img_size=(image_size, image_size))  # patch grid, rotary embeddings, ... (timm)
        if old_pos_embed is not None:  # set_input_size resampled it with antialiasing: LAVIS's resampling instead
            prefix = 0 if getattr(self.model, "no_embed_class", False) else self.model.num_prefix_tokens
            new_grid = tuple(self.model.patch_embed.grid_size)
            with torch.no_grad():
                self.model.pos_embed.copy_(resample_position_embeddings(old_pos_embed.detach(), old_grid, new_grid, prefix))
        log.info("image encoder: position embeddings resampled from a %dx%d to a %dx%d grid (%d -> %d px, bicubic) for %s",
                 *old_grid, *self.model.patch_embed.grid_size, self.config.image_size, image_size, option)
        self.config.image_size = image_size

    def _load_weights(self, path: str) -> None:
        state = load_state_dict_file(path)
        filter_fn = getattr(__import__(type(self.model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm converts original (e.g. EVA / OpenAI CLIP) key names itself, and resamples
            # position embeddings made for another image size: the way `resize` does, where the filter takes options
            options = {k: v for k, v in RESAMPLE.items() if k in inspect.signature(filter_fn).parameters}
            state = filter_fn(state, self.model, **options)
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
