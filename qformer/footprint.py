"""Training memory per GPU, planned before a run: weights, gradients, AdamW state, and activations per sample.

Everything is counted on the meta device: shapes and dtypes, no arithmetic, no memory, no weights read.
* Parameters: trained ones cost 16 bytes each (fp32 weight, fp32 gradient, AdamW's two fp32 moments); frozen ones
  2 bytes in fp16/bf16 storage (precision auto on a GPU), 4 in fp32.
* Activations: the tensors autograd saves for the backward pass, counted with saved-tensor hooks while the model
  runs once on the meta device (in fp32; attention as a fused kernel runs it, `fused_attention`), at
  `activation_bytes` per floating-point element: 2 under mixed precision,
  which computes the large matmuls in 16 bits (what autocast keeps in fp32, such as the norms' inputs, is
  counted at 2 bytes too). A tensor saved by several operations, or as a view, is counted once (by its storage);
  weights saved for the backward are not activations and are left out.
* Gradient checkpointing keeps only each checkpointed block's input; the backward recomputes one block at a time,
  whose activations are then held once: `sum(block inputs) + max(block) + the rest`.

Not counted: the CUDA context and the allocator's cache (typically 1-3 GB), the autocast copies of trained weights
(2 bytes per trained parameter, for one step), temporaries of the backward itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.fx.experimental._config  # noqa: F401 (meta_nonzero_assume_all_nonzero)
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import Blip2Config

GB = 1e9
TRAINED_BYTES = {"weights": 4, "gradients": 4, "optimizer": 8}  # fp32 master weight and gradient; AdamW's exp_avg, exp_avg_sq


@dataclass
class Activations:
    """Bytes autograd saves for one forward: inside each checkpointable block, each block's input, and the rest."""

    blocks: list[int] = field(default_factory=list)
    block_inputs: list[int] = field(default_factory=list)
    other: int = 0

    def total(self, checkpointing: bool) -> int:
        if not checkpointing:
            return sum(self.blocks) + self.other
        return sum(self.block_inputs) + max(self.blocks, default=0) + self.other

    def __add__(self, other: "Activations") -> "Activations":
        return Activations(self.blocks + other.blocks, self.block_inputs + other.block_inputs, self.other + other.other)

    def __truediv__(self, n: int) -> "Activations":
        return Activations([b // n for b in self.blocks], [b // n for b in self.block_inputs], self.other // n)


def fused_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """`F.scaled_dot_product_attention` as a fused kernel runs it (flash or memory-efficient attention on a GPU):
    it saves the queries, keys, values, output and log-sum-exp, never the (T, T) probabilities. On the meta device
    torch would pick the unfused path, which saves them (a third of a ViT-g block's activations at 364 px)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return flash(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def count_activations(run: Callable[[], Tensor], blocks: list[nn.Module], weights: list[Tensor],
                      activation_bytes: int = 2) -> Activations:
    """The bytes autograd saves while `run()` builds its graph, attributed to the `blocks` running at the time
    (floating-point tensors at `activation_bytes` an element, others at their own size)."""
    count = Activations([0] * len(blocks), [0] * len(blocks))
    seen: set[int] = {w.untyped_storage()._cdata for w in weights}
    keep: list[Tensor] = []  # what was counted stays alive, so that no storage address is reused during the run
    current: list[int | None] = [None]

    def size(tensor: Tensor, nbytes: int) -> int:
        return nbytes // tensor.element_size() * activation_bytes if tensor.is_floating_point() else nbytes

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            keep.append(tensor)
            if current[0] is None:
                count.other += size(tensor, storage.nbytes())
            else:
                count.blocks[current[0]] += size(tensor, storage.nbytes())
        return tensor

    def enter(index: int):
        def hook(module, args):
            current[0] = index
            hidden = args[0] if args else None
            if isinstance(hidden, Tensor):
                count.block_inputs[index] = size(hidden, hidden.numel() * hidden.element_size())
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = [h for i, block in enumerate(blocks)
               for h in (block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                mock.patch.object(F, "scaled_dot_product_attention", fused_attention):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return count


@dataclass
class Footprint:
    """What one GPU holds while training (bytes), for a batch of `batch_size` samples."""

    trained_parameters: int
    frozen_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: Activations  # per sample

    def total(self, batch_size: int, checkpointing: bool) -> int:
        return self.weights + self.gradients + self.optimizer + batch_size * self.activations.total(checkpointing)


def training_footprint(config: Blip2Config, train_vision: bool = False, image_size: int | None = None,
                       activation_bytes: int = 2) -> Footprint:
    """The memory a training step of this model needs (stage 2 when the config has a language model, else stage 1).

    `train_vision` counts the image encoder as trained: its parameters at 16 bytes and its activations as saved.
    """
    frozen_bytes = {name: 4 if getattr(tower, "precision", "auto") == "fp32" else 2
                    for name, tower in (("language_model.", config.language_model), ("visual_encoder.", config.vision_config))}
    config = meta_config(config, image_size)
    with torch.device("meta"):
        model = build(config)
    encoder = model.visual_encoder.model
    if train_vision:
        encoder.requires_grad_(True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {name: p.numel() for name, p in model.named_parameters() if not p.requires_grad}
    stored = sum(n * frozen_bytes["language_model." if name.startswith("language_model.") else "visual_encoder."]
                 for name, n in frozen.items())
    weights = list(model.parameters())
    size = config.vision_config.image_size
    pixels = torch.zeros(2, 3, size, size, device="meta")  # two samples: stage 1's ITM takes a negative from the batch
    vision = Activations()
    if train_vision:
        vision = count_activations(lambda: encoder.forward_features(pixels), list(encoder.blocks), weights, activation_bytes)
    with torch.no_grad():
        features = encoder.forward_features(pixels)  # (2, N, width): what the rest of the model receives
    features.requires_grad_(train_vision)
    # Masked selections (stage 2's labelled positions) need nonzero()'s count: on the meta device every element is
    # taken as selected, which is what the all-labelled text of `loss_of` has.
    with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
        rest = count_activations(lambda: loss_of(model, config, features), list(model.qformer.layers), weights, activation_bytes)
    return Footprint(trained, sum(frozen.values()), trained * TRAINED_BYTES["weights"] + stored,
                     trained * TRAINED_BYTES["gradients"], trained * TRAINED_BYTES["optimizer"], (vision + rest) / 2)


def meta_config(config: Blip2Config, image_size: int | None) -> Blip2Config:
    """A copy that builds without reading any file: no encoder weights, the LM from its config.json only."""
    data = config.to_dict()
    data["vision_config"]["weights_path"] = None
    data["vision_config"]["precision"] = "fp32"  # counted in fp32, whatever the storage (see `activation_bytes`)
    if image_size is not None:
        data["vision_config"]["image_size"] = image_size
    lm = data.get("language_model")
    if lm is not None:
        lm["adapter"] = None  # a saved adapter's shapes are those of a new one with the same settings
        lm["precision"] = "fp32"
        if lm["path"] is not None:
            import transformers

            lm["config"], lm["path"] = transformers.AutoConfig.from_pretrained(lm["path"], local_files_only=True).to_dict(), None
    return Blip2Config.from_dict(data)


def build(config: Blip2Config) -> nn.Module:
    if config.language_model is None:
        from qformer.stage1 import Stage1Model

        return Stage1Model(config)
    from qformer.stage2 import Stage2Model

    return Stage2Model(config)


def loss_of(model: nn.Module, config: Blip2Config, features: Tensor) -> Tensor:
    """One training loss of a batch of two, from image features (the encoder's tokens), on the meta device."""
    if config.language_model is None:
        from qformer import losses

        length = config.max_text_length
        ids = torch.ones(2, length, dtype=torch.long, device="meta")
        # ITG picks its targets with a mask one column shorter than its positions' (the last position predicts nothing);
        # on the meta device both selections keep every element, so here the targets take the positions' mask.
        def itg_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
            positions = attention_mask.bool()
            return positions, input_ids[positions]

        with mock.patch.object(losses, "itg_targets", itg_targets):
            return losses.stage1_losses(model, features, ids, torch.ones_like(ids), torch.arange(2, device="meta"), 1).total
    length = config.language_model.max_text_length
    ids = torch.ones(2, length, dtype=torch.long, device="meta")
    # SDPA's mask helper asks whether the mask is all ones (a value the meta device does not have); eager attention
    # does not, and saves the attention probabilities too, (B, heads, T, T): small at stage 2's short sequences.
    model.language_model.model.set_attn_implementation("eager")
    model.language_model.own_attention = "eager"
    if model.is_encoder_decoder:
        return model(features, ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    return model(features, ids, torch.ones_like(ids), ids)
