"""The stage-2 model: the stage-1 query path, one linear projection, and a frozen language model.

The 32 query outputs, projected to the LM's width, are soft visual prompts placed before the text:
* decoder-only (OPT, Llama, any causal LM): `[soft prompts ; embed(BOS + prompt + text + eos_text)]`, loss on the text only;
* encoder-decoder (FlanT5, any seq2seq LM): encoder `[soft prompts ; embed(prefix)]`, decoder target = suffix.

An instruction-aware model (`config.qformer_text_input`, InstructBLIP) also gives the Q-Former the instruction
(`qformer_input_ids`, see `qformer.instruction`), which the LM reads as its prompt: decoder-only
`[soft prompts ; instruction ; output + eos]`, loss on the output; encoder-decoder: encoder `[soft prompts ;
instruction]`, decoder the output.

Shapes: B batch, Q queries, L tokens, H the LM's embedding width.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import Blip2Config
from qformer.instruction import instruction_attention
from qformer.language_model import FrozenLanguageModel
from qformer.lm_text import IGNORE
from qformer.qformer import QFormer
from qformer.vision import FrozenImageEncoder

log = logging.getLogger(__name__)


class Stage2Model(nn.Module):
    """`train_vision`: the image encoder trains with the Q-Former (fine-tuning); the LM stays frozen."""

    def __init__(self, config: Blip2Config, language_model: FrozenLanguageModel | None = None, train_vision: bool = False):
        super().__init__()
        if config.language_model is None:
            raise ValueError("stage 2 needs config.language_model")
        self.config = config
        qc = config.qformer_config
        self.visual_encoder = FrozenImageEncoder(config.vision_config, trainable=train_vision)
        self.ln_vision = nn.LayerNorm(self.visual_encoder.width, eps=config.vision_config.ln_vision_eps)
        self.qformer = QFormer(qc, config.num_query_tokens, with_text=config.qformer_text_input)
        # The Q-Former's BERT tokenizer, for an instruction-aware model: set by whoever loads one (`load_stage2`, the
        # training module), so that `generate_text` can give the Q-Former the prompt as its instruction.
        self.instruction_tokenizer = None
        self.language_model = language_model or FrozenLanguageModel(config.language_model)
        self.language_projection = nn.Linear(qc.hidden_size, self.language_model.width)
        self.qformer._init_weights(self.language_projection)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.language_model.is_encoder_decoder

    def soft_prompts(self, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                     qformer_attention_mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W), and for an instruction-aware model the instruction (B, L) -> (B, Q, H_lm) in the LM's dtype."""
        image_embeds = self.ln_vision(self.visual_encoder(pixel_values))
        query_output = self.query_output(image_embeds, qformer_input_ids, qformer_attention_mask)  # (B, Q, D)
        dtype = self.language_model.compute_dtype(pixel_values.device)
        return self.language_projection(query_output).to(dtype)

    def query_output(self, image_embeds: Tensor, qformer_input_ids: Tensor | None, qformer_attention_mask: Tensor | None) -> Tensor:
        """The Q-Former's Q query outputs (B, Q, D); an instruction's tokens follow the queries and are dropped after."""
        if (qformer_input_ids is not None) != self.config.qformer_text_input:
            raise ValueError("an instruction-aware model (qformer_text_input) needs qformer_input_ids, and only it takes them"
                             f" (this model: qformer_text_input={self.config.qformer_text_input})")
        if qformer_input_ids is None:
            return self.qformer(image_embeds=image_embeds).last_hidden_state
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        Q = self.config.num_query_tokens
        # text_mask: the padded instruction positions skip their per-token work; no one reads their outputs.
        output = self.qformer(input_ids=qformer_input_ids, attention_mask=instruction_attention(Q, qformer_attention_mask),
                              image_embeds=image_embeds, text_mask=qformer_attention_mask)
        return output.last_hidden_state[:, :Q]

    def _with_prompts(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                      qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        prompts = self.soft_prompts(pixel_values, qformer_input_ids, qformer_attention_mask)  # (B, Q, H)
        self.language_model.use_attention_for(prompts.device)
        embeds = torch.cat([prompts, self.language_model.embed(input_ids)], dim=1)  # (B, Q + L, H)
        ones = torch.ones(prompts.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,  # decoder-only: BOS + prompt + text + eos; encoder-decoder: prefix
        attention_mask: Tensor,
        labels: Tensor,  # decoder-only: aligned with input_ids, IGNORE outside the text (always on BOS); else: targets
        decoder_attention_mask: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,  # instruction-aware model: the instruction in BERT tokens (B, L_q)
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The LM's own cross-entropy with soft visual prompts in front."""
        embeds, mask = self._with_prompts(pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask)
        lm = self.language_model.model
        if self.is_encoder_decoder:
            return lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_attention_mask).loss
        # Logits only where a text token is predicted: the LM head never runs on the other query positions. The
        # last soft prompt predicts the first text token, which carries a label only when the tokenizer adds no
        # BOS (SmolLM2's does not); a BOS (OPT's, Llama 2's) is never a label.
        L = labels.shape[1]
        if self.language_model.has_plain_head:
            # Only on the labelled positions: the head's matmul and the softmax over the vocabulary skip the prompt
            # and the padding, about half the positions of a batch of captions (SmolLM2: 49,152 words, ~8 % of a step).
            hidden = self.language_model.last_hidden_state(embeds, mask)[:, -L - 1 : -1]  # (B, L, H): each predicts the next
            labelled = labels != IGNORE
            return F.cross_entropy(self.language_model.head(hidden[labelled]).float(), labels[labelled])
        # Other LMs apply their own head: the positions go as an index tensor, not as a count. A count slices the
        # hidden states to a strided view, and a strided bf16 (B, L, H) input makes the LM head's matmul broadcast
        # its (H, V) weight to a (B, H, V) copy, forward and backward (5 s of a 7 s SmolLM2 step on CPU).
        predicting = torch.arange(embeds.shape[1] - L - 1, embeds.shape[1] - 1, device=embeds.device)
        logits = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=predicting).logits  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, qformer_input_ids: Tensor | None = None,
                 qformer_attention_mask: Tensor | None = None, **generate_kwargs) -> Tensor:
        """Token ids generated after [soft prompts ; prompt] by the LM's own `generate` (new tokens only).

        For decoder-only LMs a batch of prompts must be left-padded (the Q-Former's instruction is padded on the right).
        """
        embeds, mask = self._with_prompts(pixel_values, input_ids, attention_mask, qformer_input_ids, qformer_attention_mask)
        return self.language_model.model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
