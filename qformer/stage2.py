"""The stage-2 model: the stage-1 query path, one linear projection, and a frozen language model.

The 32 query outputs, projected to the LM's width, are soft visual prompts placed before the text:
* decoder-only (OPT, Llama, any causal LM): `[soft prompts ; embed(BOS + prompt + text + eos_text)]`, loss on the text only;
* encoder-decoder (FlanT5, any seq2seq LM): encoder `[soft prompts ; embed(prefix)]`, decoder target = suffix.

Shapes: B batch, Q queries, L tokens, H the LM's embedding width.
"""

from __future__ import annotations

import functools
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import Blip2Config, LanguageModelConfig
from qformer.files import read_gguf, read_tokenizer
from qformer.frozen import Frozen
from qformer.qformer import QFormer
from qformer.vision import FrozenImageEncoder

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_EOS_TEXT = "\n"  # LAVIS ends OPT captions with a newline and stops generating there (see resolve_eos_text)
VQA_PROMPTS = {"decoder": "Question: {} Answer:", "encoder_decoder": "Question: {} Short answer:"}
CAPTION_PROMPT = "a photo of"
# Causal LMs whose logits are exactly their output embedding applied to their base model's last hidden state (no
# soft-capping or scaling after the head, as Gemma 2 and Cohere have): stage 2 runs their head on labelled positions only.
PLAIN_HEAD_MODEL_TYPES = ("opt", "llama", "mistral", "qwen2", "gpt2")


class FrozenLanguageModel(Frozen):
    """A transformers causal or seq2seq LM, from a local folder, a GGUF file or a config; frozen, in its own precision."""

    def __init__(self, config: LanguageModelConfig):
        import transformers

        if (config.path is None) == (config.config is None):
            raise ValueError("language_model: give exactly one of path (a local folder or .gguf file) or config (a dict)")
        if config.path is not None:
            hf_config = from_local(transformers.AutoConfig, config)
        else:
            config_dict = dict(config.config)
            if "model_type" not in config_dict:
                raise ValueError("language_model.config needs a 'model_type' (e.g. 'opt' or 't5')")
            hf_config = transformers.AutoConfig.for_model(**config_dict)
        encoder_decoder = bool(getattr(hf_config, "is_encoder_decoder", False))
        if encoder_decoder and config.precision == "fp16":
            raise ValueError("language_model.precision: fp16 overflows in T5-style models; use bf16 or fp32")
        super().__init__(config.precision, "language_model.precision", torch.bfloat16 if encoder_decoder else torch.float16)
        auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
        if config.path is not None:
            self.model = from_local(auto, config, config=hf_config)
        else:
            self.model = auto.from_config(hf_config)
        self.is_encoder_decoder = encoder_decoder
        self.own_attention = self.model.config._attn_implementation  # SDPA where the model has it
        self.freeze()

    def use_attention_for(self, device: torch.device) -> None:
        """Eager attention where a backward will follow on a CPU; the model's own (SDPA) otherwise.

        torch's CPU flash-attention backward in bf16 takes ~9x its forward at stage 2's short sequences (15 ms a call
        for SmolLM2 at batch 48 and 29 positions, 29 % of the step); with eager attention (matmul + softmax) the
        bf16 step takes 1.34 s instead of 1.85 s, and in fp32 the two are equal. The sequences are short (the soft
        prompts and at most max_text_length tokens), so eager attention's quadratic scores cost nothing. Without
        gradients (generation, validation) SDPA's forward is the faster one (~8 % in beam search).
        """
        wanted = "eager" if device.type == "cpu" and torch.is_grad_enabled() else self.own_attention
        if self.model.config._attn_implementation != wanted:
            self.model.set_attn_implementation(wanted)

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def embed(self, input_ids: Tensor) -> Tensor:  # (B, L) -> (B, L, H)
        return self.model.get_input_embeddings()(input_ids)

    @property
    def has_plain_head(self) -> bool:
        return not self.is_encoder_decoder and self.model.config.model_type in PLAIN_HEAD_MODEL_TYPES

    def last_hidden_state(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:  # (B, T, H), before the LM head
        return self.model.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def head(self, hidden: Tensor) -> Tensor:  # (..., H) -> (..., V)
        return self.model.get_output_embeddings()(hidden)


def gguf_location(config: LanguageModelConfig) -> tuple[Path, str] | None:
    """(folder, file name) when the LM is a GGUF file: `path` to the .gguf itself, or `path` + `gguf_file`."""
    if config.path is None:
        return None
    if config.gguf_file is not None:
        return Path(config.path), config.gguf_file
    path = Path(config.path)
    return (path.parent, path.name) if path.suffix.lower() == ".gguf" else None


def from_local(auto, lm: LanguageModelConfig, **kwargs):
    """`auto.from_pretrained` (AutoConfig, AutoModel*, AutoTokenizer) of the LM's folder or GGUF file, offline."""
    gguf = gguf_location(lm)
    if gguf is None:
        return auto.from_pretrained(lm.path, local_files_only=True, **kwargs)
    folder, name = gguf
    return read_gguf(folder / name, lambda: auto.from_pretrained(str(folder), gguf_file=name, local_files_only=True, **kwargs))


def load_lm_tokenizer(config: LanguageModelConfig):
    """The LM's tokenizer: its own folder (`tokenizer`, as exports have it), the GGUF file, or the LM's folder.

    A tokenizer without a pad token (Llama's; SmolLM2's GGUF names one) pads with its eos token: padding is
    masked by the attention mask and left out of the loss by position, so which id fills it does not matter.
    """
    from transformers import AutoTokenizer

    if config.tokenizer is None and gguf_location(config) is not None:
        tokenizer = from_local(AutoTokenizer, config)
    else:
        source = config.tokenizer or config.path
        if source is None:
            raise ValueError("language_model.tokenizer: a tokenizer folder is needed when the LM is built from a config")
        tokenizer = read_tokenizer(source, lambda folder: AutoTokenizer.from_pretrained(folder, local_files_only=True))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Stage2Model(nn.Module):
    def __init__(self, config: Blip2Config, language_model: FrozenLanguageModel | None = None):
        super().__init__()
        if config.language_model is None:
            raise ValueError("stage 2 needs config.language_model")
        self.config = config
        qc = config.qformer_config
        self.visual_encoder = FrozenImageEncoder(config.vision_config)
        self.ln_vision = nn.LayerNorm(self.visual_encoder.width, eps=config.vision_config.ln_vision_eps)
        self.qformer = QFormer(qc, config.num_query_tokens, with_text=False)
        self.language_model = language_model or FrozenLanguageModel(config.language_model)
        self.language_projection = nn.Linear(qc.hidden_size, self.language_model.width)
        self.qformer._init_weights(self.language_projection)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.language_model.is_encoder_decoder

    def soft_prompts(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, Q, H_lm) in the LM's dtype."""
        image_embeds = self.ln_vision(self.visual_encoder(pixel_values))
        query_output = self.qformer(image_embeds=image_embeds).last_hidden_state  # (B, Q, D)
        dtype = self.language_model.compute_dtype(pixel_values.device)
        return self.language_projection(query_output).to(dtype)

    def _with_prompts(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        prompts = self.soft_prompts(pixel_values)  # (B, Q, H)
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
    ) -> Tensor:
        """The LM's own cross-entropy with soft visual prompts in front."""
        embeds, mask = self._with_prompts(pixel_values, input_ids, attention_mask)
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
    def generate(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, **generate_kwargs) -> Tensor:
        """Token ids generated after [soft prompts ; prompt] by the LM's own `generate` (new tokens only).

        For decoder-only LMs a batch of prompts must be left-padded.
        """
        embeds, mask = self._with_prompts(pixel_values, input_ids, attention_mask)
        return self.language_model.model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# --- text batches -----------------------------------------------------------------------------------
@dataclass
class TextBatch:
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    decoder_attention_mask: Tensor | None = None

    def as_kwargs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        if self.decoder_attention_mask is not None:
            kwargs["decoder_attention_mask"] = self.decoder_attention_mask
        return kwargs


def decoder_only_batch(tokenizer, texts: list[str], prompt: str = "", eos_text: str = DEFAULT_EOS_TEXT, max_length: int = 32) -> TextBatch:
    """`prompt + text + eos_text` right-padded; labels only on the text and eos (not BOS, prompt or padding).

    The prompt is masked as its tokens occur in the full text, not as `len(tokenizer(prompt))`: a byte-level BPE
    (OPT, GPT-2, SmolLM2) tokenises the trailing space of "a photo of " on its own, but in "a photo of a dog"
    that space belongs to the next word, whose token must stay in the loss.
    """
    tokenizer.padding_side = "right"
    fast = getattr(tokenizer, "is_fast", False)  # then one tokenisation gives the ids and the character offsets
    tokens = tokenizer([prompt + t + eos_text for t in texts], padding="longest", truncation=True, max_length=max_length,
                       return_tensors="pt", return_offsets_mapping=fast, return_special_tokens_mask=fast)
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, IGNORE)
    for row, length in enumerate(prompt_token_counts(tokenizer, tokens, prompt)):
        labels[row, :length] = IGNORE
    return TextBatch(tokens["input_ids"], tokens["attention_mask"], labels)


def prompt_token_counts(tokenizer, tokens, prompt: str) -> list[int]:
    """Per row of `tokens`, how many leading tokens (special ones included) lie entirely inside `prompt`.

    From character offsets when the tokenizer is fast; otherwise by the common start of the ids of the prompt
    alone and of the whole text (a token the prompt shares with the text is then not counted).
    """
    counts = []
    if "offset_mapping" in tokens:
        for offsets, special in zip(tokens["offset_mapping"].tolist(), tokens["special_tokens_mask"].tolist()):
            count = 0
            while count < len(offsets) and (special[count] or offsets[count][1] <= len(prompt)):
                count += 1
            counts.append(count)
        return counts
    prompt_ids = tokenizer(prompt)["input_ids"]
    for ids in tokens["input_ids"].tolist():
        count = 0
        while count < min(len(ids), len(prompt_ids)) and ids[count] == prompt_ids[count]:
            count += 1
        counts.append(count)
    return counts


def encoder_decoder_batch(tokenizer, prefixes: list[str], targets: list[str], max_length: int = 32) -> TextBatch:
    """Prefixes to the encoder (after the soft prompts), targets to the decoder; padding ignored."""
    source = tokenizer(prefixes, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    target = tokenizer(targets, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE)
    return TextBatch(source["input_ids"], source["attention_mask"], labels, target["attention_mask"])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """The paper's prefix language modelling: cut at a random word between the first and the middle."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:cut]), " ".join(words[cut:])


def prompt_batch(tokenizer, prompts: list[str], encoder_decoder: bool, max_length: int | None = None) -> dict:
    """Prompts for generation: left-padded for decoder-only LMs so every row ends where generation starts.

    A prompt longer than `max_length` tokens keeps its end (where "Answer:" stands), with a warning.
    """
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    tokens = tokenizer(prompts, padding="longest", return_tensors="pt")
    if max_length is not None and tokens["input_ids"].shape[1] > max_length:  # rare: tokenise again, keeping the ends
        log.warning("a prompt longer than %d tokens (what the LM's positions leave after the soft prompts and the new "
                    "tokens) was cut to its last %d tokens", max_length, max_length)
        tokenizer.truncation_side = "left"
        tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        tokenizer.truncation_side = "right"
    tokenizer.padding_side = "right"
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def decode_generated(tokenizer, ids: Tensor, eos_text: str | None) -> list[str]:
    """Generated ids -> text, cut at `eos_text` and stripped."""
    texts = [t.lstrip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    if eos_text:
        texts = [t.split(eos_text)[0] for t in texts]
    return [t.strip() for t in texts]


def resolve_eos_text(tokenizer, eos_text: str | None) -> str:
    """The text a decoder-only caption ends with, in training and in generation alike.

    Default "\\n", as LAVIS for OPT, wherever it is one token: in the byte-level BPEs of OPT, GPT-2, Llama 3 and
    SmolLM2 ("Ċ"), where a pretrained LM ends a line with it on its own, so zero-shot answers stop there too.
    A SentencePiece Llama (1 and 2) splits it into "▁" + "<0x0A>", and generation stops at the first token of the
    end text, which would be any space: such a tokenizer ends captions with its eos token ("</s>") instead.
    A tokenizer that drops the text (a word-level one drops "\\n") would train captions without an end and generate
    without a stop: its eos token is used instead, with a warning.
    """
    if not eos_text:
        eos_text = DEFAULT_EOS_TEXT
        if len(tokenizer(eos_text, add_special_tokens=False)["input_ids"]) > 1 and tokenizer.eos_token is not None:
            return tokenizer.eos_token
    if tokenizer(eos_text, add_special_tokens=False)["input_ids"]:
        return eos_text
    if tokenizer.eos_token is None:
        raise ValueError(f"language_model.eos_text {eos_text!r} is no token for this tokenizer, which has no eos token either: "
                         "set language_model.eos_text (--model.eos_text, or the export's config.json) to a text it knows")
    warnings.warn(f"language_model.eos_text {eos_text!r} tokenises to nothing; captions end with the tokenizer's "
                  f"eos token {tokenizer.eos_token!r} instead", stacklevel=2)
    return tokenizer.eos_token


@functools.lru_cache(maxsize=4)  # a pass over the vocabulary (~0.2 s for 49k tokens), once per tokenizer, not per batch
def end_token_ids(tokenizer, eos_text: str) -> list[int]:
    """The tokens that end a text: every token whose text contains `eos_text`, and the tokenizer's eos token.

    A byte-level BPE has many tokens that hold a newline ("\\n\\n", " \\n", ".\\n"), and an instruct LM ends its
    turn with its own eos token (SmolLM2's "<|im_end|>"). With only "\\n" as the end, `min_new_tokens` holds back
    "\\n" on the first step and the LM ends with one of the others instead, which decodes to an empty answer
    (SmolLM2 answered every zero-shot question with "<|im_end|>" + "\\n").
    """
    vocabulary = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    first = tokenizer(eos_text, add_special_tokens=False)["input_ids"][0]
    own_end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return sorted({first, *own_end, *(i for i, text in enumerate(vocabulary) if eos_text in text)})


@dataclass(frozen=True)
class GenerationSettings:
    """How captions and answers are generated: beam search, or nucleus sampling when `top_p` is set.

    Args:
        num_beams: beam width (1: greedy).
        max_new_tokens: at most this many tokens after the prompt.
        min_new_tokens: at least this many (the LM's end token is held back until then).
        length_penalty: beam-score exponent on the length (> 0 favours longer texts, < 0 shorter ones).
        repetition_penalty: > 1 discourages repeating tokens.
        top_p: nucleus sampling with this probability mass instead of beam search.
        temperature: sampling temperature (with top_p).
    """

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    top_p: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        problems = []
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got {self.min_new_tokens} "
                            f"and {self.max_new_tokens}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))


CAPTION_GENERATION = GenerationSettings(min_new_tokens=8)  # LAVIS's COCO captioning: beam 5, 8 to 30 tokens
VQA_GENERATION = GenerationSettings(max_new_tokens=10, length_penalty=-1.0)  # LAVIS's zero-shot VQA: short answers


def vqa_prompt(model: "Stage2Model", template: str | None = None) -> str:
    """The question template: the given one, or the paper's for the LM's family."""
    return template or VQA_PROMPTS["encoder_decoder" if model.is_encoder_decoder else "decoder"]


def prompt_room(model: "Stage2Model", max_new_tokens: int) -> int | None:
    """How many prompt tokens fit in the LM's positions beside the soft prompts and the new tokens (None: no limit)."""
    positions = getattr(model.language_model.model.config, "max_position_embeddings", None)
    if positions is None or model.is_encoder_decoder:  # T5 has relative positions
        return None
    room = positions - model.config.num_query_tokens - max_new_tokens
    if room < 2:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the LM's {positions} positions "
                         f"({model.config.num_query_tokens} are the soft prompts)")
    return room


def generate_text(
    model: Stage2Model,
    tokenizer,
    pixel_values: Tensor,
    prompts: list[str],
    settings: GenerationSettings = GenerationSettings(),
) -> list[str]:
    """Captions or answers for a batch of images, one prompt each."""
    room = prompt_room(model, settings.max_new_tokens)
    batch = {k: v.to(pixel_values.device) for k, v in prompt_batch(tokenizer, prompts, model.is_encoder_decoder, room).items()}
    kwargs = dict(
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        length_penalty=settings.length_penalty,
        repetition_penalty=settings.repetition_penalty,
        do_sample=settings.top_p is not None,
        pad_token_id=tokenizer.pad_token_id,
    )
    if settings.top_p is not None:
        kwargs.update(top_p=settings.top_p, temperature=settings.temperature)
    eos_text = None
    if not model.is_encoder_decoder:
        eos_text = resolve_eos_text(tokenizer, model.config.language_model.eos_text)
        kwargs["eos_token_id"] = end_token_ids(tokenizer, eos_text)
    ids = model.generate(pixel_values, **batch, **kwargs)
    return decode_generated(tokenizer, ids, eos_text)
