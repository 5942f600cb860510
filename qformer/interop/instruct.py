"""InstructBLIP's names: our instruction-aware stage-2 model <-> transformers' `InstructBlipForConditionalGeneration`.

transformers' InstructBLIP differs from its BLIP-2 in three names only: the Q-Former keeps its word/position embeddings
(`qformer.embeddings.*`, as InstructBLIP keeps what BLIP-2's stage 2 drops), the embedding norm lives there too
(`qformer.embeddings.layernorm`, BLIP-2's `qformer.layernorm`), and every layer's text feed-forward
(`intermediate` / `output`) carries weights. Everything else maps as for `Blip2ForConditionalGeneration`.
LAVIS's `blip2_t5_instruct` / `blip2_vicuna_instruct` use BERT's names as its BLIP-2 does (`qformer.interop.names`).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from qformer.interop.names import hf_vision_fields, stage2_key_to_hf, stage2_to_hf

ARCHITECTURE = "InstructBlipForConditionalGeneration"

_EMBEDDINGS_TO_HF = {
    "qformer.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "qformer.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "qformer.embeddings.norm.weight": "qformer.embeddings.layernorm.weight",
    "qformer.embeddings.norm.bias": "qformer.embeddings.layernorm.bias",
}


def instruct_key_to_hf(key: str) -> str:
    """Our instruction-aware stage-2 key (image encoder excluded) -> `InstructBlipForConditionalGeneration` key."""
    return _EMBEDDINGS_TO_HF.get(key) or stage2_key_to_hf(key)


def instruct_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our instruction-aware stage-2 state dict -> `InstructBlipForConditionalGeneration` state dict."""
    return stage2_to_hf(state, instruct_key_to_hf)


def instruct_hf_config(model, image_token_index: int):
    """A transformers `InstructBlipConfig` describing our instruction-aware stage-2 model."""
    import transformers

    config = model.config
    return transformers.InstructBlipConfig(
        vision_config=transformers.InstructBlipVisionConfig(**hf_vision_fields(config, model.visual_encoder)).to_dict(),
        qformer_config=transformers.InstructBlipQFormerConfig(**dataclasses.asdict(config.qformer_config)).to_dict(),
        text_config=model.language_model.model.config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_index=image_token_index,
    )


def to_hf_instruct(model, image_token_index: int):
    """Our instruction-aware Stage2Model -> an equal `InstructBlipForConditionalGeneration` (same weights)."""
    import transformers

    if not model.config.qformer_text_input:
        raise ValueError("InstructBLIP needs an instruction-aware model (qformer_text_input: true)")
    hf = transformers.InstructBlipForConditionalGeneration(instruct_hf_config(model, image_token_index))
    hf.load_state_dict(instruct_to_hf(model.state_dict()), strict=True)
    hf.vision_model.post_layernorm.eps = model.ln_vision.eps  # LAVIS's ln_vision eps (transformers reuses the ViT's)
    return hf.eval()
