"""Weight-name conversion between our modules and BERT / LAVIS / transformers.

Every conversion is strict: each source key must map somewhere and each target key must be filled,
except the keys a conversion names as intentionally absent, which it returns so callers can report them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

# Inside one Q-Former layer: our name -> BERT's name (LAVIS uses BERT's names).
# transformers says `attention.attention` where BERT says `attention.self`.
LAYER_TO_BERT = {
    "self_attn.query": "attention.self.query",
    "self_attn.key": "attention.self.key",
    "self_attn.value": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.query": "crossattention.self.query",
    "cross_attn.key": "crossattention.self.key",
    "cross_attn.value": "crossattention.self.value",
    "cross_attn.out_proj": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "text_ffn.fc1": "intermediate.dense",
    "text_ffn.fc2": "output.dense",
    "text_ffn.norm": "output.LayerNorm",
    "query_ffn.fc1": "intermediate_query.dense",
    "query_ffn.fc2": "output_query.dense",
    "query_ffn.norm": "output_query.LayerNorm",
}

_LAYER_KEY = re.compile(r"qformer\.layers\.(\d+)\.(\w+\.\w+)\.(weight|bias)")


def qformer_layer_key(key: str, layer_prefix: str, self_word: str = "self") -> str | None:
    """`qformer.layers.3.self_attn.query.weight` -> `{layer_prefix}3.attention.{self_word}.query.weight`."""
    match = _LAYER_KEY.fullmatch(key)
    if match is None:
        return None
    index, module, kind = match.groups()
    name = LAYER_TO_BERT[module].replace(".self.", f".{self_word}.")
    return f"{layer_prefix}{index}.{name}.{kind}"


# --- frozen image encoder: timm ViT / EVA <-> transformers' Blip2VisionModel ------------------------
_VISION_TO_HF = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}
_VISION_BLOCK_TO_HF = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def vision_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm `VisionTransformer` or `Eva` weights (blocks already pruned) -> `Blip2VisionModel` without post_layernorm."""
    out = {}
    for key, value in state.items():
        if key in _VISION_TO_HF:
            out[_VISION_TO_HF[key]] = value
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|q_bias|v_bias)", key)
        if match is None:
            raise KeyError(f"image encoder key {key!r} has no transformers counterpart")
        index, module, kind = match.groups()
        prefix = f"encoder.layers.{index}."
        if kind in ("q_bias", "v_bias"):  # EVA keeps q and v biases apart and has no k bias
            continue
        out[prefix + _VISION_BLOCK_TO_HF[module] + "." + kind] = value
        if module == "attn.qkv" and kind == "weight" and f"blocks.{index}.attn.q_bias" in state:
            q_bias, v_bias = state[f"blocks.{index}.attn.q_bias"], state[f"blocks.{index}.attn.v_bias"]
            out[prefix + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def vision_from_hf(hf_state: dict[str, Tensor], eva_biases: bool) -> dict[str, Tensor]:
    """`Blip2VisionModel` weights (no post_layernorm) -> timm names; `eva_biases` splits qkv.bias into q/v."""
    inverse = {v: k for k, v in _VISION_TO_HF.items()}
    block_inverse = {v: k for k, v in _VISION_BLOCK_TO_HF.items()}
    out = {}
    for key, value in hf_state.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match is None or match.group(2) not in block_inverse:
            raise KeyError(f"transformers vision key {key!r} has no timm counterpart")
        index, module, kind = match.groups()
        name = f"blocks.{index}.{block_inverse[module]}"
        if eva_biases and module == "self_attn.qkv" and kind == "bias":
            q_bias, k_bias, v_bias = value.chunk(3)
            if k_bias.abs().max() > 0:
                raise ValueError(f"{key}: EVA has no key bias, but the k part of qkv.bias is non-zero")
            out[f"blocks.{index}.attn.q_bias"], out[f"blocks.{index}.attn.v_bias"] = q_bias, v_bias
        else:
            out[f"{name}.{kind}"] = value
    return out


# --- stage-1 model <-> transformers' Blip2ForImageTextRetrieval ----------------------------------
STAGE1_NOT_IN_HF = ("temp", "lm_head.")  # transformers has no ITC temperature and no ITG head


def stage1_key_to_hf(key: str) -> str | None:
    """Our stage-1 key -> `Blip2ForImageTextRetrieval` key; None for keys transformers lacks."""
    if key.startswith(STAGE1_NOT_IN_HF):
        return None
    fixed = {
        "qformer.query_tokens": "query_tokens",
        "qformer.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "qformer.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "qformer.embeddings.norm.weight": "qformer.layernorm.weight",
        "qformer.embeddings.norm.bias": "qformer.layernorm.bias",
        "ln_vision.weight": "vision_model.post_layernorm.weight",
        "ln_vision.bias": "vision_model.post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    for ours, theirs in (("vision_proj.", "vision_projection."), ("text_proj.", "text_projection."), ("itm_head.", "itm_head.")):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    layer_key = qformer_layer_key(key, "qformer.encoder.layer.", self_word="attention")
    if layer_key is None:
        raise KeyError(f"stage-1 key {key!r} has no transformers counterpart")
    return layer_key


def stage1_to_hf(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Our stage-1 state dict -> (`Blip2ForImageTextRetrieval` state dict, our keys left out)."""
    hf, dropped, vision = {}, [], {}
    for key, value in state.items():
        if key.startswith("visual_encoder.model."):
            vision[key[len("visual_encoder.model.") :]] = value
            continue
        hf_key = stage1_key_to_hf(key)
        if hf_key is None:
            dropped.append(key)
        else:
            hf[hf_key] = value
    hf.update({"vision_model." + k: v for k, v in vision_to_hf(vision).items()})
    return hf, dropped


def stage1_from_hf(
    hf_state: dict[str, Tensor], our_keys: list[str], eva_biases: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """`Blip2ForImageTextRetrieval` state dict -> (our state dict, our keys transformers cannot fill)."""
    to_ours = {stage1_key_to_hf(k): k for k in our_keys if not k.startswith("visual_encoder.")}
    to_ours.pop(None, None)
    state, vision = {}, {}
    for key, value in hf_state.items():
        if key.startswith("vision_model.") and key not in to_ours:
            vision[key[len("vision_model.") :]] = value
        elif key in to_ours:
            state[to_ours[key]] = value
        else:
            raise KeyError(f"transformers key {key!r} has no counterpart in our stage-1 model")
    state.update({"visual_encoder.model." + k: v for k, v in vision_from_hf(vision, eva_biases).items()})
    return state, check_complete(state, our_keys)


# --- stage-2 model <-> transformers' Blip2ForConditionalGeneration -----------------------------------
def stage2_key_to_hf(key: str) -> str:
    if key.startswith("language_model.model."):
        return "language_model." + key[len("language_model.model.") :]
    if key.startswith("language_projection."):
        return key
    hf_key = stage1_key_to_hf(key)
    if hf_key is None or hf_key.startswith("embeddings."):
        raise KeyError(f"stage-2 key {key!r} has no transformers counterpart")
    return hf_key


def stage2_to_hf(state: dict[str, Tensor], key_to_hf: Callable[[str], str] = stage2_key_to_hf) -> dict[str, Tensor]:
    """Our stage-2 state dict -> `Blip2ForConditionalGeneration` state dict (`key_to_hf` names the non-vision keys:
    InstructBLIP passes its own)."""
    hf, vision = {}, {}
    for key, value in state.items():
        if key.startswith("visual_encoder.model."):
            vision[key[len("visual_encoder.model.") :]] = value
        else:
            hf[key_to_hf(key)] = value
    hf.update({"vision_model." + k: v for k, v in vision_to_hf(vision).items()})
    return hf


def check_complete(state: dict[str, Tensor], our_keys: list[str], may_miss: Callable[[str], bool] | None = None) -> list[str]:
    """Our keys missing from `state`: those allowed by `STAGE1_NOT_IN_HF` / `may_miss` are returned, others fail."""
    missing = [k for k in our_keys if k not in state]
    allowed = may_miss or (lambda k: k.startswith(STAGE1_NOT_IN_HF))
    bad = [k for k in missing if not allowed(k)]
    if bad:
        raise KeyError(f"converted weights lack {len(bad)} keys: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return missing


def hf_vision_fields(config, visual_encoder) -> dict:
    """The vision-tower fields of transformers' `Blip2VisionConfig` / `InstructBlipVisionConfig`, read off the timm model."""
    vit = visual_encoder.model
    block = vit.blocks[0]
    return dict(
        hidden_size=visual_encoder.width,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=config.vision_config.image_size,
        patch_size=vit.patch_embed.patch_size[0],
        layer_norm_eps=block.norm1.eps,
        qkv_bias=True,
    )


def hf_config(config, visual_encoder, text_config=None, image_token_index=None):
    """A transformers `Blip2Config` describing our model (vision tower read off the timm model).

    Stage 2 passes the LM's `text_config`; transformers then puts the soft prompts at `image_token_index` tokens.
    """
    import dataclasses

    import transformers

    vision = transformers.Blip2VisionConfig(**hf_vision_fields(config, visual_encoder))
    qformer = transformers.Blip2QFormerConfig(
        **dataclasses.asdict(config.qformer_config), use_qformer_text_input=text_config is None
    )
    return transformers.Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=None if text_config is None else text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.image_text_hidden_size,
        image_token_index=image_token_index,
    )


def to_hf_retrieval(model):
    """Our Stage1Model -> an equal `Blip2ForImageTextRetrieval` (same weights), plus the keys it cannot hold."""
    import transformers

    state, dropped = stage1_to_hf(model.state_dict())
    hf = transformers.Blip2ForImageTextRetrieval(hf_config(model.config, model.visual_encoder))
    hf.load_state_dict(state, strict=True)
    hf.vision_model.post_layernorm.eps = model.ln_vision.eps  # LAVIS's ln_vision eps (transformers reuses the ViT's)
    return hf.eval(), dropped


def to_hf_generation(model, image_token_index: int):
    """Our Stage2Model -> an equal `Blip2ForConditionalGeneration` (same weights)."""
    import transformers

    lm_config = model.language_model.model.config
    hf = transformers.Blip2ForConditionalGeneration(hf_config(model.config, model.visual_encoder, lm_config, image_token_index))
    hf.load_state_dict(stage2_to_hf(model.state_dict()), strict=True)
    hf.vision_model.post_layernorm.eps = model.ln_vision.eps
    return hf.eval()


# --- LAVIS (Blip2Qformer / Blip2OPT / Blip2T5) --------------------------------------------------------
# LAVIS keys with no counterpart of ours, dropped on import: the ITG decoder weight is tied to the word
# embeddings and its bias is `cls.predictions.bias` again; position_ids is a buffer; the frozen LMs (`llm_model` in
# `blip2_vicuna_instruct`) are loaded from their own folder.
LAVIS_IGNORED = re.compile(
    r"Qformer\.cls\.predictions\.decoder\.(weight|bias)|Qformer\.bert\.embeddings\.position_ids|(opt|t5|llm)_model\..*"
)


def lavis_key(key: str) -> str:
    """Our key (either stage) -> LAVIS's key (`Blip2Qformer`, `Blip2OPT`, `Blip2T5`; EVA names = timm's)."""
    fixed = {
        "qformer.query_tokens": "query_tokens",
        "qformer.embeddings.word_embeddings.weight": "Qformer.bert.embeddings.word_embeddings.weight",
        "qformer.embeddings.position_embeddings.weight": "Qformer.bert.embeddings.position_embeddings.weight",
        "qformer.embeddings.norm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
        "qformer.embeddings.norm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
        "lm_head.dense.weight": "Qformer.cls.predictions.transform.dense.weight",
        "lm_head.dense.bias": "Qformer.cls.predictions.transform.dense.bias",
        "lm_head.norm.weight": "Qformer.cls.predictions.transform.LayerNorm.weight",
        "lm_head.norm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
        "lm_head.bias": "Qformer.cls.predictions.bias",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("visual_encoder.model."):
        return "visual_encoder." + key[len("visual_encoder.model.") :]
    if key.startswith(("vision_proj.", "text_proj.", "itm_head.", "ln_vision.")) or key == "temp":
        return key
    layer_key = qformer_layer_key(key, "Qformer.bert.encoder.layer.")
    if layer_key is None:
        raise KeyError(f"key {key!r} has no LAVIS counterpart")
    return layer_key


def bert_key(key: str) -> str | None:
    """Our stage-1 key -> the key of a BERT checkpoint (LAVIS's name without its `Qformer.` prefixes); None
    for keys BERT has no weights for. The query FFN starts as a copy of BERT's FFN, as in LAVIS."""
    try:
        lavis = lavis_key(key.replace(".query_ffn.", ".text_ffn."))
    except KeyError:
        return None
    for prefix in ("Qformer.bert.", "Qformer."):
        if lavis.startswith(prefix):
            return lavis[len(prefix) :]
    return None


def from_lavis(lavis_state: dict[str, Tensor], our_keys: list[str], projection: str | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """LAVIS state dict -> (our state dict, LAVIS keys dropped as documented). Unknown keys fail by name.

    `projection` is LAVIS's name of the stage-2 projection (`opt_proj`, `t5_proj`, or `llm_proj` in
    `blip2_vicuna_instruct`), our `language_projection`.
    """
    to_ours = {lavis_key(k): k for k in our_keys if not k.startswith(("language_projection.", "language_model."))}
    if projection is not None:
        to_ours.update({f"{projection}.weight": "language_projection.weight", f"{projection}.bias": "language_projection.bias"})
    state, dropped = {}, []
    for key, value in lavis_state.items():
        if key in to_ours:
            state[to_ours[key]] = value
        elif LAVIS_IGNORED.fullmatch(key):
            dropped.append(key)
        else:
            raise KeyError(f"LAVIS key {key!r} has no counterpart in our model (is this a BLIP-2 checkpoint of this stage?)")
    return state, dropped
