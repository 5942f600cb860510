"""The Querying Transformer: a BERT encoder whose first Q positions are learned queries.

Queries and text share every self-attention layer; only the queries cross-attend to the image
(every `cross_attention_frequency`-th layer) and only the queries use their own feed-forward weights.
What each position may see is decided by one boolean attention mask (see `qformer.masks`), so one
forward serves all four stage-1 modes: queries only (ITC image side), text only (ITC text side),
queries + text bidirectional (ITM), and causal text over cached query keys/values (ITG).

The image enters the cross-attention as keys/values only. `QFormer.image_kv` projects a set of images once
(an `ImageKV`); any number of query passes then read it, each batch row through an index into the set. Stage 1
runs four passes over each image per step (ITC, and three ITM pairs) and the retrieval re-rank one per
candidate pair, so projecting once per distinct image removes most of the cross-attention's cost.

Text is padded to a fixed length (32, as LAVIS: the ITM gather across ranks needs one shape), so on COCO more than
half of the text positions are padding. Given the text's padding mask, every per-token computation (projections,
feed-forward) runs on the real tokens only (`real_token_index`, `on_tokens`): a padded position is masked as a key
everywhere and no loss reads its output, so only the attention itself still spans the padded length.

Shapes: B batch, Q queries, L text tokens, T = Q + L, N image tokens, D hidden, H heads, Dh = D / H,
I distinct images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qformer.config import QFormerConfig
from qformer.masks import with_queries

KeyValue = tuple[Tensor, Tensor]  # (B, H, Q, Dh) each


@dataclass
class ImageKV:
    """Cross-attention keys/values of I images, per layer (None for a layer without cross-attention),
    and which image each batch row attends to (`index` (B,) into I; None: row b attends to image b)."""

    layers: list[KeyValue | None]  # (I, H, N, Dh) each
    index: Tensor | None = None

    def select(self, index: Tensor) -> "ImageKV":
        """The same projected images, read by a new batch whose row b shows image `index[b]`."""
        return ImageKV(self.layers, index if self.index is None else self.index[index])

    def for_layer(self, i: int) -> KeyValue | None:
        kv = self.layers[i]
        if kv is None or self.index is None:
            return kv
        return kv[0].index_select(0, self.index), kv[1].index_select(0, self.index)  # a gather: no projection is repeated


class AttentionBlock(nn.Module):
    """BERT attention with its post-norm residual: norm(x + dropout(out_proj(attend(x, context))))."""

    def __init__(self, config: QFormerConfig, context_size: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_size, config.hidden_size)
        self.value = nn.Linear(context_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)

    def key_value(self, source: Tensor) -> KeyValue:  # (B, S, Dc) -> (B, H, S, Dh) each
        return self._heads(self.key(source)), self._heads(self.value(source))

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        context: KeyValue | None = None,  # projected context (B, H, N, Dh) each; None = self-attention
        mask: Tensor | None = None,  # bool (B, 1, T, S), True = may attend
        past: KeyValue | None = None,  # keys/values prepended to this call's own (self-attention only)
        index: Tensor | None = None,  # flat positions of x to project (`real_token_index`); None = all
    ) -> tuple[Tensor, KeyValue]:
        q = self._heads(on_tokens(self.query, x, index))  # (B, H, T, Dh)
        if context is None:
            k, v = self._heads(on_tokens(self.key, x, index)), self._heads(on_tokens(self.value, x, index))
        else:
            k, v = context  # (B, H, S, Dh)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        attended = attended.transpose(1, 2).flatten(2)  # (B, T, D)
        return self.norm(x + self.dropout(on_tokens(self.out_proj, attended, index))), (k, v)


class FeedForward(nn.Module):
    """BERT feed-forward with its post-norm residual."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if config.hidden_act != "gelu":
            raise ValueError(f"qformer_config.hidden_act: only 'gelu' is supported, got {config.hidden_act!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


def real_token_index(token_mask: Tensor | None) -> Tensor | None:
    """(B, T) 1 = real token -> flat indices (R,) of the real tokens in (B * T), or None when there is no padding.

    Found once per forward (a `nonzero`: a host sync on a GPU). torch.compile gets None: a data-dependent token
    count would break its graph.
    """
    if token_mask is None or torch.compiler.is_compiling():
        return None
    index = token_mask.flatten().nonzero().squeeze(1)
    return None if len(index) == token_mask.numel() else index


def on_tokens(module: nn.Module, x: Tensor, index: Tensor | None) -> Tensor:
    """A width-preserving per-token module applied at the flat positions `index` of x (B, T, D) only.

    The other positions keep x: any finite value does, nothing reads them.
    """
    if index is None:
        return module(x)
    flat = x.flatten(0, 1)
    return flat.index_copy(0, index, module(flat.index_select(0, index))).view_as(x)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool, with_text: bool = True):
        super().__init__()
        self.self_attn = AttentionBlock(config, config.hidden_size)
        self.cross_attn = AttentionBlock(config, config.encoder_hidden_size) if has_cross_attention else None
        self.text_ffn = FeedForward(config) if with_text else None
        self.query_ffn = FeedForward(config)

    def forward(
        self,
        x: Tensor,  # (B, T, D), the first num_queries positions are queries
        num_queries: int,
        mask: Tensor | None,  # bool (B, 1, T, P + T)
        image_kv: KeyValue | None,  # this layer's image keys/values (B, H, N, Dh)
        past: KeyValue | None,  # (B, H, P, Dh) cached query keys/values
        token_index: Tensor | None = None,  # real positions of x (`real_token_index`): projected and ...
        text_index: Tensor | None = None,  # ... of its text part: through the text FFN; None = all
    ) -> tuple[Tensor, KeyValue]:
        x, (k, v) = self.self_attn(x, mask=mask, past=past, index=token_index)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries > 0:
            if self.cross_attn is not None:
                if image_kv is None:
                    raise ValueError("queries need an image in a cross-attention layer")
                queries, _ = self.cross_attn(queries, context=image_kv)
            queries = self.query_ffn(queries)
        if text.shape[1] > 0:
            text = on_tokens(self.text_ffn, text, text_index)
        # Keys/values of the query positions only: the ITG pass appends its text to them.
        start = 0 if past is None else past[0].shape[2]
        query_kv = (k[:, :, : start + num_queries], v[:, :, : start + num_queries])
        x = queries if text.shape[1] == 0 else text if num_queries == 0 else torch.cat([queries, text], dim=1)
        return x, query_kv


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings for the text; the norm covers [queries ; text].

    Without text (stage 2 uses only the query path) just the norm remains.
    """

    def __init__(self, config: QFormerConfig, with_text: bool = True):
        super().__init__()
        if with_text:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, query_embeds: Tensor | None, input_ids: Tensor | None) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]  # (B, Q, D), no position embedding
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # text starts at 0
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, L, D)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.norm(x))  # (B, T, D)


@dataclass
class QFormerOutput:
    last_hidden_state: Tensor  # (B, T, D)
    query_kv: list[KeyValue]  # per layer, keys/values of the query positions (B, H, Q, Dh)


class QFormer(nn.Module):
    """Learned queries + BERT encoder with query-only cross-attention and query-only FFNs.

    `with_text=False` builds the query path alone (stage 2): no word/position embeddings, no text FFNs.
    """

    def __init__(self, config: QFormerConfig, num_query_tokens: int, with_text: bool = True):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, config.hidden_size))  # (1, Q, D)
        self.embeddings = TextEmbeddings(config, with_text)
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0, with_text=with_text)
            for i in range(config.num_hidden_layers)
        )
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        # Recompute each layer's activations in the backward pass instead of storing them: less memory, ~1/3 more compute.
        self.gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def image_kv(self, image_embeds: Tensor) -> ImageKV:
        """Project I images (I, N, Dv) to every cross-attention layer's keys/values, once."""
        return ImageKV([None if layer.cross_attn is None else layer.cross_attn.key_value(image_embeds) for layer in self.layers])

    def forward(
        self,
        input_ids: Tensor | None = None,  # (B, L)
        attention_mask: Tensor | None = None,  # bool (B, 1, T, P + T) from qformer.masks; None = all visible
        image_embeds: Tensor | ImageKV | None = None,  # (B, N, Dv), or images already projected; needed with queries
        use_queries: bool = True,
        past_query_kv: list[KeyValue] | None = None,  # from an earlier query pass; P = its Q
        text_mask: Tensor | None = None,  # (B, L) 1 = real token: padded text positions skip the per-token work
    ) -> QFormerOutput:
        """Run queries and/or text through the encoder.

        With `use_queries` the learned queries come first; `past_query_kv` lets text attend to the
        queries of an earlier pass (ITG) without recomputing them. With `text_mask` the outputs at padded
        text positions are not computed (they hold intermediate values): pass it only where no one reads them.
        """
        if not use_queries and input_ids is None:
            raise ValueError("QFormer.forward needs queries, text or both")
        image_kv = self.image_kv(image_embeds) if isinstance(image_embeds, Tensor) else image_embeds
        batch = input_ids.shape[0] if input_ids is not None else batch_size(image_kv)
        query_embeds = self.query_tokens.expand(batch, -1, -1) if use_queries else None
        num_queries = self.num_query_tokens if use_queries else 0
        x = self.embeddings(query_embeds, input_ids)  # (B, T, D)
        text_index = real_token_index(text_mask)
        token_index = text_index if not use_queries or text_index is None else real_token_index(with_queries(num_queries, text_mask))
        query_kv = []
        for i, layer in enumerate(self.layers):
            past = past_query_kv[i] if past_query_kv is not None else None
            layer_image = image_kv.for_layer(i) if use_queries and image_kv is not None else None
            x, kv = self.run_layer(layer, x, num_queries, attention_mask, layer_image, past, token_index, text_index)
            query_kv.append(kv)
        return QFormerOutput(last_hidden_state=x, query_kv=query_kv)

    def run_layer(self, layer: QFormerLayer, *args) -> tuple[Tensor, KeyValue]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing keeps the RNG state, so dropout draws the same masks when recomputed.
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


def batch_size(image_kv: ImageKV) -> int:
    if image_kv.index is not None:
        return len(image_kv.index)
    return next(kv[0].shape[0] for kv in image_kv.layers if kv is not None)
