"""The stage-1 model: frozen image encoder -> ln_vision -> Q-Former, with the ITC / ITM / ITG heads.

This module computes features and logits; the three losses live in `qformer.losses`.
Shapes: B batch, Q queries, L text tokens, N image tokens, D Q-Former width, E projection width, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import Blip2Config
from qformer.masks import generation_mask, padding_mask, with_queries
from qformer.qformer import ImageKV, KeyValue, QFormer, QFormerOutput
from qformer.vision import FrozenImageEncoder


class LMHead(nn.Module):
    """BERT's prediction head for ITG; its output matrix is the (tied) word-embedding matrix."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:  # (B, L, D), (V, D) -> (B, L, V)
        return F.linear(self.norm(F.gelu(self.dense(x))), word_embeddings, self.bias)


class Stage1Model(nn.Module):
    """`train_vision`: the image encoder trains too (fine-tuning); by default it is frozen."""

    def __init__(self, config: Blip2Config, train_vision: bool = False):
        super().__init__()
        self.config = config
        qc = config.qformer_config
        self.visual_encoder = FrozenImageEncoder(config.vision_config, trainable=train_vision)
        if self.visual_encoder.width != qc.encoder_hidden_size:
            raise ValueError(
                f"qformer_config.encoder_hidden_size is {qc.encoder_hidden_size} but the image encoder "
                f"{config.vision_config.model_name!r} is {self.visual_encoder.width} wide"
            )
        self.ln_vision = nn.LayerNorm(self.visual_encoder.width, eps=config.vision_config.ln_vision_eps)  # trainable, unlike the encoder
        self.qformer = QFormer(qc, config.num_query_tokens)
        self.vision_proj = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(qc.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qc.hidden_size, 2)
        self.lm_head = LMHead(qc.hidden_size, qc.vocab_size, qc.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for head in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head.dense):
            self.qformer._init_weights(head)

    # --- image side -------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, Dv)
        return self.ln_vision(self.visual_encoder(pixel_values))

    def image_kv(self, image_embeds: Tensor) -> ImageKV:
        """The images' cross-attention keys/values, projected once for any number of passes that read them."""
        return self.qformer.image_kv(image_embeds)

    def query_forward(self, images: Tensor | ImageKV) -> QFormerOutput:
        """Queries only, bidirectional, cross-attending to the image (the ITC image pass).

        `images`: ln_vision outputs (B, N, Dv), or their `image_kv`.
        """
        return self.qformer(image_embeds=images)

    def image_feats(self, query_output: Tensor) -> Tensor:  # (B, Q, D) -> (B, Q, E), unit norm
        return F.normalize(self.vision_proj(query_output), dim=-1)

    # --- text side --------------------------------------------------------------------------------
    def text_feat(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # (B, L) -> (B, E)
        """Text only, bidirectional over real tokens; the [CLS] output is the text feature."""
        hidden = self.qformer(input_ids, padding_mask(attention_mask), use_queries=False, text_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    # --- joint ------------------------------------------------------------------------------------
    @staticmethod
    def itc_similarity(image_feats: Tensor, text_feat: Tensor) -> Tensor:
        """Cosine similarity, max over queries: (Bi, Q, E), (Bt, E) -> (Bi, Bt). No temperature."""
        return torch.einsum("iqe,te->iqt", image_feats, text_feat).amax(dim=1)

    def itm_logits(self, images: Tensor | ImageKV, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Queries + text, fully bidirectional; itm_head averaged over the query outputs. -> (B, 2)

        `images`: ln_vision outputs (B, N, Dv), or an `image_kv` whose index gives each text's image.
        """
        Q = self.qformer.num_query_tokens
        mask = padding_mask(with_queries(Q, attention_mask))
        hidden = self.qformer(input_ids, mask, image_embeds=images, text_mask=attention_mask).last_hidden_state  # (B, Q + L, D)
        return self.itm_head(hidden[:, :Q]).mean(dim=1)

    def itg_logits(self, input_ids: Tensor, attention_mask: Tensor, query_kv: list[KeyValue],
                   positions: Tensor | None = None) -> Tensor:
        """Causal text over the cached query keys/values of the image pass. -> (B, L, V), or (P, V) at `positions`

        `input_ids` must already start with [DEC]; position i predicts token i + 1. `positions` (B, L) bool picks
        the positions to project onto the vocabulary (the loss needs only those that predict a real token).
        """
        Q = self.qformer.num_query_tokens
        mask = generation_mask(Q, attention_mask)[:, :, Q:]  # text rows only: (B, 1, L, Q + L)
        hidden = self.qformer(input_ids, mask, use_queries=False, past_query_kv=query_kv, text_mask=attention_mask).last_hidden_state
        if positions is not None:
            hidden = hidden[positions]  # (P, D)
        return self.lm_head(hidden, self.qformer.embeddings.word_embeddings.weight)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
