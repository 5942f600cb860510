"""Stage 2 as a thin LightningModule around `qformer.Stage2Model`, on the same skeleton as stage 1."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, LoraSettings, build_config
from qformer.folders import load_stage1_into_stage2, load_text_weights, read_config, read_export_info
from qformer.instruction import QFORMER_KEYS, instruction_tokens
from qformer.language_model import load_lm_tokenizer
from qformer.lm_text import decoder_only_batch, encoder_decoder_batch, resolve_eos_text, split_caption
from qformer.stage2 import Stage2Model
from qformer.transfer import check_source, load_for_transfer, lstsq_projection
from stages.distributed import gather_objects
from stages.train.base import TrainingSkeleton, checkpoint_callbacks
from stages.train.optim import HeadStart, drop_held_gradients

log = logging.getLogger(__name__)


class LanguageModelText:
    """Captions (and instructions) -> the frozen LM's input and labels, in the data workers (`stages.data.captions.Collate`).

    Decoder-only: [prompt ; caption + eos], loss on the caption. Encoder-decoder: the prompt into the encoder and the
    caption as the target, or, with no prompt (the paper's pre-training), each caption split at a random word into
    prefix and suffix, drawn from (split_seed, epoch, sample index) so that a resumed run splits as the first did.
    Instruction data (`stages.data.instructions`): a sample's instruction is its prompt (decoder-only: followed by a
    space unless it ends in one, so that its last word and the output's first stay apart), the caption its output;
    a sample without one takes `prompt`. With `qformer_tokenizer` (an instruction-aware Q-Former, `qformer_text_input`)
    the batch also carries each sample's instruction (or prompt) in the Q-Former's tokens
    (`qformer.instruction.instruction_tokens`).
    """

    takes_instructions = True  # the data module gives this encoder VQA and instruction files

    def __init__(self, tokenizer, encoder_decoder: bool, prompt: str, eos_text: str | None, max_length: int, split_seed: int,
                 qformer_tokenizer=None):
        self.tokenizer, self.encoder_decoder, self.prompt = tokenizer, encoder_decoder, prompt
        self.eos_text, self.max_length, self.split_seed = eos_text, max_length, split_seed
        self.qformer_tokenizer = qformer_tokenizer

    def __call__(self, captions: list[str], keys: list[tuple[int, int]], instructions: list[str | None] | None = None) -> dict:
        text = {"lm_text": self.batch(captions, keys, instructions).as_kwargs()}
        if self.qformer_tokenizer is not None:
            prompts = [self.prompt if i is None else i for i in instructions or [None] * len(captions)]
            text.update(instruction_tokens(self.qformer_tokenizer, prompts))
        return text

    def batch(self, captions: list[str], keys: list[tuple[int, int]], instructions: list[str | None] | None = None):
        instructions = instructions or [None] * len(captions)
        if not self.encoder_decoder:
            prompts = [self.prompt if i is None else i if i[-1:].isspace() else i + " " for i in instructions]
            return decoder_only_batch(self.tokenizer, captions, prompts, self.eos_text, self.max_length)
        prompts = [self.prompt if i is None else i for i in instructions]
        prefixes, targets = zip(*(self._encoder_decoder_pair(c, p, key) for c, p, key in zip(captions, prompts, keys)))
        return encoder_decoder_batch(self.tokenizer, list(prefixes), list(targets), self.max_length)

    def _encoder_decoder_pair(self, caption: str, prompt: str, key: tuple[int, int]) -> tuple[str, str]:
        if prompt:
            return prompt, caption
        epoch, index = key
        return split_caption(caption, random.Random(f"{self.split_seed}:{epoch}:{index}"))


def check_start(stage1, init_from, init_projection: str, warmup_steps: int, lr_scale: float, qformer_text_input: bool = False) -> None:
    """The start and warm-up options, each mistake in one line."""
    if (stage1 is None) == (init_from is None) and not (stage1 and init_from and qformer_text_input):
        raise ValueError(f"model.stage1 or model.init_from: give exactly one (a stage-1 export, or a stage-2 export to "
                         f"transfer from), got {'both' if stage1 else 'neither'}")
    if init_from is not None and qformer_text_input and stage1 is None and not read_config(init_from).qformer_text_input:
        raise ValueError(f"model.init_from: {init_from} is a plain BLIP-2 stage-2 export, without the Q-Former's text weights "
                         "(word/position embeddings, text feed-forward) that model.qformer_text_input needs: give model.stage1 "
                         "too, the stage-1 export it was trained from, to take them from")
    if init_projection not in ("new", "lstsq", "keep"):
        raise ValueError(f"model.init_projection must be new, lstsq or keep, got {init_projection!r}")
    if init_projection != "new" and init_from is None:
        raise ValueError(f"model.init_projection {init_projection} needs model.init_from (the projection it starts from)")
    if warmup_steps < 0:
        raise ValueError(f"model.projection_warmup_steps must be >= 0 (0: no warm-up), got {warmup_steps}")
    if not lr_scale > 0:
        raise ValueError(f"model.projection_lr_scale must be > 0, got {lr_scale}")
    if lr_scale != 1.0 and warmup_steps == 0:
        raise ValueError("model.projection_lr_scale applies during the projection warm-up only: set model.projection_warmup_steps")


def lora_settings(lm_lora: dict | None) -> LoraSettings | None:
    """`model.lm_lora` checked as a config section: an unknown key or a wrong type is named."""
    return None if lm_lora is None else build_config(LoraSettings, lm_lora, "model.lm_lora", "model.lm_lora.")


class Stage2Module(TrainingSkeleton):
    """Stage-2 generative learning: the stage-1 Q-Former feeds a frozen language model through one projection.

    Args:
        stage1: a stage-1 export folder (`qformer export`); its Q-Former query path and ln_vision are loaded.
            Give it or init_from.
        init_from: instead of stage1, a stage-2 export trained against another LM (transfer, as VPGTrans): its
            Q-Former and ln_vision are loaded and a new projection is made for this LM's width. Its Q-Former and image
            encoder are used as they are; the data's feature cache must come from that encoder.
        init_projection: with init_from, how the new projection starts: new (random, as from stage 1) or lstsq (the
            old projection followed by a ridge least-squares map from the old LM's input embeddings to this LM's,
            fitted on the words both tokenizers hold as one token) or keep (the old projection as it is: a fine-tune
            of a stage-2 export against the same LM, e.g. COCO captioning with train_vision).
        projection_warmup_steps: the first this many optimizer steps train the projection alone (the Q-Former is
            held: no update, no change to its AdamW state), at projection_lr_scale x lr and without weight decay;
            then both train with the usual warmup + cosine, its warmup_steps counted from there. 0: no warm-up.
        projection_lr_scale: the projection's lr multiplier during the warm-up (VPGTrans: 5).
        qformer_text_input: an instruction-aware Q-Former (InstructBLIP): the prompt or each sample's instruction, in
            BERT tokens, follows the queries in the Q-Former's self-attention. The Q-Former keeps its text weights from
            stage 1. From a plain stage-2 export (init_from), give stage1 too: the text weights come from there.
        lm_path: local transformers folder of the frozen LM (OPT, FlanT5, Llama, any causal or seq2seq LM), or a
            GGUF file (e.g. SmolLM2's; needs the gguf and accelerate packages), whose tokenizer is then used too.
        lm_gguf_file: the GGUF file's name inside the folder lm_path (instead of lm_path naming the file).
        lm_config: a transformers config dict to build the LM from instead (random weights; tests and demos).
        lm_tokenizer: the LM's tokenizer folder, when it is not inside `lm_path`.
        lm_precision: auto (on GPU bf16 for T5-style, fp16 for decoder-only; on CPU bf16 under
            --trainer.precision bf16-mixed, else fp32), fp32, fp16 or bf16.
        lm_lora: train a LoRA adapter on the frozen LM too, with PEFT's LoraConfig fields: r (rank, default 8),
            lora_alpha (16), lora_dropout (0.05), target_modules (default: PEFT's for the model type, e.g. q_proj and
            v_proj for OPT and Llama). The LM's own weights stay frozen; exports keep the adapter in PEFT's layout
            (`lm_adapter/`), and `qformer export-hf` merges it into the LM. Needs the peft package.
        prompt: decoder-only: text before every caption, excluded from the loss; encoder-decoder: the encoder
            text, with the whole caption as target. Empty (the paper's pre-training): decoder-only trains on the
            caption, encoder-decoder splits each caption at a random word into prefix and suffix.
        eos_text: appended to decoder-only targets (default "\\n", as LAVIS does for OPT, where the tokenizer has it as one
            token; else the tokenizer's eos token, e.g. a SentencePiece Llama's "</s>").
        max_text_length: LM tokens per text.
        lr, min_lr, weight_decay, warmup_steps: AdamW and the warmup + cosine schedule (per optimizer step).
        split_seed: seed of the prefix/suffix split.
        val_caption: caption every validation image and log BLEU-4 and CIDEr (val/bleu4, val/cider).
        val_num_beams, val_max_new_tokens: generation settings for those captions.
        max_consecutive_skips: stop the run after this many skipped steps in a row (a step is skipped when its
            loss or gradients are not finite, or no image of the batch could be read); 0: never stop.
        compile: torch.compile the Q-Former (minutes of compiling at start; then faster steps on GPU).
        gradient_checkpointing: recompute each Q-Former layer's activations in the backward pass instead of
            storing them (less memory, about a third more Q-Former compute: for 24 GB GPUs).
        save_every_n_steps: also write `last.ckpt` every this many optimizer steps (0: at epoch ends and
            validations only), so a preempted or killed run loses at most that many steps.
        train_vision: train the image encoder too (fine-tuning, as BLIP-2's captioning and retrieval recipes): its
            weights stay fp32 (an autocast computes in bf16/fp16), gradient_checkpointing covers its blocks, and
            checkpoints and exports carry it. A feature cache cannot be used then.
        vision_lr_decay: layer-wise lr decay on the trained encoder: block i of L gets lr * decay ** (L - i), the
            patch/position/class embeddings lr * decay ** (L + 1); 1: one lr for all (BLIP-2 retrieval: 0.95).
        vision_lr_scale: the trained encoder's lrs (after the decay) times this; below 1 moves the encoder less than
            the Q-Former (on the demo's random encoder 3-30 made the Q-Former lose what it read: docs/finetuning.md).
    """

    def __init__(
        self,
        stage1: str | None = None,
        lm_path: str | None = None,
        lm_gguf_file: str | None = None,
        lm_config: dict | None = None,
        lm_tokenizer: str | None = None,
        lm_precision: str = "auto",
        lm_lora: dict | None = None,
        prompt: str = "",
        eos_text: str | None = None,
        max_text_length: int = 32,
        lr: float = 1e-4,
        min_lr: float = 5e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 2000,
        split_seed: int = 0,
        val_caption: bool = True,
        val_num_beams: int = 3,
        val_max_new_tokens: int = 20,
        max_consecutive_skips: int = 25,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        save_every_n_steps: int = 0,
        init_from: str | None = None,
        init_projection: str = "new",
        projection_warmup_steps: int = 0,
        projection_lr_scale: float = 1.0,
        qformer_text_input: bool = False,
        train_vision: bool = False,
        vision_lr_decay: float = 1.0,
        vision_lr_scale: float = 1.0,
    ):
        super().__init__(max_consecutive_skips, compile, gradient_checkpointing, save_every_n_steps, train_vision, vision_lr_decay,
                         vision_lr_scale)
        self.save_hyperparameters()
        self.val_captions: dict = {}
        self.val_references: dict = {}
        if init_from is not None:
            check_source(init_from)  # before the LM, maybe a large file, is loaded
        check_start(stage1, init_from, init_projection, projection_warmup_steps, projection_lr_scale, qformer_text_input)
        start = init_from or stage1
        if stage1 is not None and read_export_info(stage1).get("stage") != 1:
            raise ValueError(f"model.stage1: {stage1} is not a stage-1 export")
        config = read_config(start)
        config.qformer_text_input = qformer_text_input
        config.language_model = LanguageModelConfig(
            path=lm_path, gguf_file=lm_gguf_file, config=lm_config, tokenizer=lm_tokenizer, precision=lm_precision, eos_text=eos_text,
            max_text_length=max_text_length, lora=lora_settings(lm_lora),
        )
        self.model = Stage2Model(config, train_vision=train_vision)
        self.lm_tokenizer = load_lm_tokenizer(config.language_model)
        if init_from is None:
            unused = load_stage1_into_stage2(self.model, stage1)
            log.info("loaded the stage-1 Q-Former from %s (%d stage-1-only tensors not used)", stage1, len(unused))
        else:
            self._transfer(init_from, init_projection)
            if stage1 is not None:  # an instruction-aware model from a plain stage-2 export (check_start)
                load_text_weights(self.model, stage1)
                log.info("the Q-Former's text weights from the stage-1 export %s", stage1)
        if qformer_text_input:
            self.model.instruction_tokenizer = load_tokenizer(Path(stage1 or init_from) / "tokenizer")
        eos = None if self.model.is_encoder_decoder else resolve_eos_text(self.lm_tokenizer, config.language_model.eos_text)
        self.lm_text = LanguageModelText(self.lm_tokenizer, self.model.is_encoder_decoder, prompt, eos, max_text_length, split_seed,
                                         self.model.instruction_tokenizer)

    def _transfer(self, folder: str, init_projection: str) -> None:
        old = load_for_transfer(self.model, folder)
        if init_projection == "lstsq":
            new = lstsq_projection(old, folder, self.model.language_model, self.lm_tokenizer)
            self.model.language_projection.load_state_dict(new)
        elif init_projection == "keep":
            width = self.model.language_projection.out_features
            if old["weight"].shape[0] != width:
                raise ValueError(f"model.init_projection keep: {folder} projects to width {old['weight'].shape[0]}, this "
                                 f"run's LM is {width} wide; use new or lstsq for another LM")
            self.model.language_projection.load_state_dict(old)
        log.info("transfer: the Q-Former and ln_vision of %s; a %s projection to width %d", folder, init_projection,
                 self.model.language_model.width)

    def optimizer_head_start(self) -> HeadStart | None:
        hp = self.hparams
        return HeadStart("language_projection.", hp.projection_warmup_steps, hp.projection_lr_scale)

    def on_before_optimizer_step(self, optimizer) -> None:
        """During the projection warm-up the Q-Former's gradients are dropped before the step (and before clipping)."""
        if self.hparams.projection_warmup_steps:
            drop_held_gradients(optimizer, self.lr_schedulers().last_epoch)
        super().on_before_optimizer_step(optimizer)

    def text_encoder(self) -> tuple:
        return self.lm_text, self.hparams.max_text_length, "model.max_text_length"

    def _loss(self, batch: dict) -> torch.Tensor:
        # Only an instruction-aware model reads the instruction's BERT tokens (a plain one ignores them, if a batch has them).
        instruction = {k: batch[k] for k in QFORMER_KEYS} if self.model.config.qformer_text_input else {}
        return self.model(batch["pixel_values"], **batch["lm_text"], **instruction)

    def training_loss(self, batch: dict) -> torch.Tensor:
        loss = self._loss(batch)
        size = len(batch["pixel_values"])
        self.log("train/loss_lm", loss, batch_size=size, prog_bar=True)
        groups = self.optimizers().param_groups
        self.log("train/lr", groups[0]["lr"], batch_size=size)
        if self.hparams.projection_warmup_steps:
            self.log("train/lr_projection", groups[-1]["lr"], batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.note_validation_batch(batch):
            return
        self.log("val/loss_lm", self._loss(batch), batch_size=len(batch["pixel_values"]), sync_dist=True)
        if self.hparams.val_caption:
            self._caption_new_images(batch)

    @torch.no_grad()
    def _caption_new_images(self, batch: dict) -> None:
        from qformer.generation import GenerationSettings, generate_text

        image_ids = batch["image_ids"].tolist()
        for image_id, caption in zip(image_ids, batch["captions"]):
            self.val_references.setdefault(image_id, set()).add(caption)
        new = [n for n, i in enumerate(image_ids) if i not in self.val_captions and i not in image_ids[:n]]
        if not new:
            return
        settings = GenerationSettings(num_beams=self.hparams.val_num_beams, max_new_tokens=self.hparams.val_max_new_tokens)
        # With task templates a caption's prompt is its instruction (the caption task's first template in validation),
        # as in training; without, the fixed prompt.
        instructions = batch.get("instructions") or [None] * len(image_ids)
        prompts = [self.hparams.prompt if instructions[n] is None else instructions[n] for n in new]
        texts = generate_text(self.model, self.lm_tokenizer, batch["pixel_values"][new], prompts, settings)
        self.val_captions.update({image_ids[n]: t for n, t in zip(new, texts)})

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.hparams.val_caption and self.val_captions:
            from stages.eval.metrics import caption_metrics

            captions, references = self.val_captions, self.val_references
            if self.trainer.world_size > 1:  # every rank scores the union, so every rank logs the same value
                parts = gather_objects((captions, references))
                captions = {k: v for c, _ in parts for k, v in c.items()}
                references = {}
                for _, r in parts:
                    for k, v in r.items():
                        references.setdefault(k, set()).update(v)
            scores, _ = caption_metrics(captions, {k: sorted(v) for k, v in references.items()}, tokenizer="python", meteor="off")
            self.log("val/bleu4", scores["bleu4"], sync_dist=True)  # the same value on every rank
            self.log("val/cider", scores["cider"], sync_dist=True)
        self.val_captions, self.val_references = {}, {}

    def configure_callbacks(self):
        """`last.ckpt`, and the best checkpoint by validation CIDEr when there is a validation split."""
        data = getattr(self.trainer, "datamodule", None)
        validated = self.hparams.val_caption and data is not None and getattr(data.hparams, "val", None) is not None
        return checkpoint_callbacks("val/cider" if validated else None, "best-{step}-{val/cider:.1f}", self.save_every_n_steps)
