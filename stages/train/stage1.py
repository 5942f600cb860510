"""Stage 1 as a thin LightningModule around `qformer.Stage1Model` and `qformer.losses`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qformer.bert import init_from_bert, load_tokenizer
from qformer.config import resolve_config
from qformer.files import read_safetensors
from qformer.folders import load_strict, read_config, read_export_info
from qformer.losses import stage1_losses
from qformer.stage1 import Stage1Model
from stages.data.text import BertText
from stages.distributed import all_gather_with_grad, current_share, world
from stages.train.base import TrainingSkeleton, checkpoint_callbacks

log = logging.getLogger(__name__)


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct id, in order of first appearance."""
    seen, keep = set(), []
    for position, value in enumerate(ids.tolist()):
        if value not in seen:
            seen.add(value)
            keep.append(position)
    return torch.tensor(keep, dtype=torch.long, device=ids.device)


def start_from_export(folder: str, config, bert, vision_weights, tokenizer) -> tuple:
    """(model config, tokenizer folder) of a stage-1 export a fine-tune continues from; its image encoder comes with it."""
    given = [name for name, value in (("config", config), ("bert", bert), ("vision_weights", vision_weights)) if value is not None]
    if given:
        raise ValueError(f"model.init_from: the export {folder} brings its own model; drop model.{', model.'.join(given)}")
    if read_export_info(folder).get("stage") != 1:
        raise ValueError(f"model.init_from: {folder} is not a stage-1 export")
    return read_config(folder), tokenizer or str(Path(folder) / "tokenizer")


class Stage1Module(TrainingSkeleton):
    """Stage-1 representation learning: ITC + ITM + ITG against a frozen image encoder.

    Args:
        config: model preset (vitg, vitl, tiny; default tiny) or a JSON/YAML model config file.
        vision_weights: local weights file for the image encoder (overrides the config's `weights_path`).
        bert: local BERT folder (bert-base-uncased in the paper): initialises the Q-Former, gives the tokenizer.
        tokenizer: BERT tokenizer folder, when the Q-Former starts from scratch instead of from `bert`.
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW decay of the weight matrices.
        warmup_steps: linear warmup, in optimizer steps.
        val_retrieval: retrieval recall on the validation split each validation: "itc" (ITC ranking, fast),
            "itm" (ITC top-k re-ranked with ITM, as the paper evaluates) or "off".
        val_k_test: candidates re-ranked per query with val_retrieval="itm".
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
        init_from: a stage-1 export folder to fine-tune (e.g. for retrieval, with train_vision): its config, weights,
            image encoder and tokenizer start the run (instead of config, bert and vision_weights).
        vision_lr_decay: layer-wise lr decay on the trained encoder: block i of L gets lr * decay ** (L - i), the
            patch/position/class embeddings lr * decay ** (L + 1); 1: one lr for all (BLIP-2 retrieval: 0.95).
        vision_lr_scale: the trained encoder's lrs (after the decay) times this; below 1 moves the encoder less than
            the Q-Former (on the demo's random encoder 3-30 made the Q-Former lose what it read: docs/finetuning.md).
    """

    def __init__(
        self,
        config: str | None = None,
        vision_weights: str | None = None,
        bert: str | None = None,
        tokenizer: str | None = None,
        lr: float = 1e-4,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        warmup_steps: int = 2000,
        val_retrieval: str = "itc",
        val_k_test: int = 16,
        max_consecutive_skips: int = 25,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        save_every_n_steps: int = 0,
        train_vision: bool = False,
        vision_lr_decay: float = 1.0,
        vision_lr_scale: float = 1.0,
        init_from: str | None = None,
    ):
        super().__init__(max_consecutive_skips, compile, gradient_checkpointing, save_every_n_steps, train_vision, vision_lr_decay,
                         vision_lr_scale)
        self.save_hyperparameters()
        if val_retrieval not in ("itc", "itm", "off"):
            raise ValueError(f"model.val_retrieval must be itc, itm or off, got {val_retrieval!r}")
        self.val_outputs: list[dict] = []
        if init_from is not None:
            model_config, tokenizer = start_from_export(init_from, config, bert, vision_weights, tokenizer)
        if tokenizer is None and bert is None:
            raise ValueError("model.tokenizer or model.bert: a local BERT tokenizer folder is needed")
        self.tokenizer = load_tokenizer(tokenizer or bert)
        if init_from is None:
            try:
                model_config = resolve_config(config or "tiny")
            except ValueError as error:
                raise ValueError(f"model.config: {error}") from None
        if vision_weights is not None:
            model_config.vision_config.weights_path = vision_weights
        if model_config.qformer_config.vocab_size != len(self.tokenizer):
            log.info("qformer_config.vocab_size set to the tokenizer's %d", len(self.tokenizer))
            model_config.qformer_config.vocab_size = len(self.tokenizer)
        self.model = Stage1Model(model_config, train_vision=train_vision)
        if bert is not None:
            not_filled = init_from_bert(self.model, bert)
            log.info("initialised from BERT %s; %d tensors start fresh", bert, len(not_filled))
        if init_from is not None:
            load_strict(self.model, read_safetensors(Path(init_from) / "model.safetensors"), f"model.init_from {init_from}")
            log.info("continuing from the stage-1 export %s", init_from)

    def _losses(self, batch: dict):
        rank, _ = world()
        return stage1_losses(
            self.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_ids"],
            self.tokenizer.bos_token_id, all_gather_with_grad, rank,
        )

    def text_encoder(self) -> tuple:
        length = self.model.config.max_text_length
        return BertText(self.tokenizer, length), length, "max_text_length (model.config)"

    def training_loss(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            self.model.temp.clamp_(0.001, 0.5)
        losses = self._losses(batch)
        size = len(batch["input_ids"])
        for name in ("itc", "itm", "itg"):
            self.log(f"train/loss_{name}", getattr(losses, name), batch_size=size, prog_bar=True)
        self.log("train/loss", losses.total, batch_size=size)
        self.log("train/temp", self.model.temp.detach(), batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return losses.total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.note_validation_batch(batch):
            return
        losses = self._losses(batch)  # one image pass: its features also feed the retrieval recall below
        size = len(batch["input_ids"])
        for name in ("itc", "itm", "itg"):
            self.log(f"val/loss_{name}", getattr(losses, name), batch_size=size, sync_dist=True)
        self.log("val/loss", losses.total, batch_size=size, sync_dist=True)
        if self.hparams.val_retrieval != "off":
            self.val_outputs.append(
                {
                    "image_ids": batch["image_ids"],
                    "sample_ids": batch["sample_ids"],
                    "image_feats": losses.image_feats,
                    "text_feat": losses.text_feat,
                    "image_embeds": losses.image_embeds if self.hparams.val_retrieval == "itm" else losses.image_embeds[:, :0],
                    "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"],
                }
            )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.hparams.val_retrieval != "off" and self.val_outputs:
            for name, value in self._validation_recalls().items():
                self.log(f"val/{name}", value, sync_dist=True)  # the same value on every rank
        self.val_outputs = []

    @torch.no_grad()
    def _validation_recalls(self) -> dict[str, float]:
        """Retrieval recall over the whole validation split, gathered from every rank (same result on each)."""
        from qformer.retrieval import RetrievalFeatures, discard_nonfinite, itc_only_scores, itc_similarity, rerank
        from stages.eval.metrics import retrieval_recalls

        length = max(o["input_ids"].shape[1] for o in self.val_outputs)  # pad text to one length to concatenate
        pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731
        local = {k: torch.cat([pad(o[k]) if k in ("input_ids", "attention_mask") else o[k] for o in self.val_outputs]) for k in self.val_outputs[0]}
        everything = {k: self.all_gather(v).flatten(0, 1) if self.trainer.world_size > 1 else v for k, v in local.items()}
        texts = first_occurrences(everything["sample_ids"])  # DistributedSampler pads with repeats
        images = first_occurrences(everything["image_ids"][texts])
        image_row = {int(everything["image_ids"][texts][i]): row for row, i in enumerate(images.tolist())}
        txt2img = [image_row[int(i)] for i in everything["image_ids"][texts]]
        img2txt = [[] for _ in images]
        for t, i in enumerate(txt2img):
            img2txt[i].append(t)
        text_feat = everything["text_feat"][texts]
        image_feats = everything["image_feats"][texts][images]
        sim = itc_similarity(image_feats, text_feat)
        if self.hparams.val_retrieval == "itc":
            score_i2t, score_t2i = itc_only_scores(sim)
        else:
            features = RetrievalFeatures(everything["image_embeds"][texts][images], image_feats, text_feat,
                                         everything["input_ids"][texts], everything["attention_mask"][texts])
            score_i2t, score_t2i = rerank(self.model, features, sim, self.hparams.val_k_test, share=current_share())
        discard_nonfinite(score_i2t, score_t2i, image_feats, text_feat)  # a diverged model's checkpoint is never the best
        recalls = retrieval_recalls(score_i2t.cpu(), score_t2i.cpu(), img2txt, txt2img)
        return {k: v for k, v in recalls.items() if k.startswith(("txt_r", "img_r", "r_mean"))}

    def configure_callbacks(self):
        """`last.ckpt`, and the best checkpoint by validation recall when there is a validation split."""
        data = getattr(self.trainer, "datamodule", None)
        validated = self.hparams.val_retrieval != "off" and data is not None and getattr(data.hparams, "val", None) is not None
        return checkpoint_callbacks("val/r_mean" if validated else None, "best-{step}-{val/r_mean:.2f}", self.save_every_n_steps)
