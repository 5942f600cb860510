"""What both training stages share: the optimiser, trainable-only checkpoints, skipped images and skipped steps.

A step is skipped, never applied, when any process has a batch without one readable image, a non-finite
loss or a non-finite gradient: every process makes the same decision (one all-reduce of a flag), so
DDP processes stay in step. Skipped steps are counted (`train/skipped_steps`) and named with their samples;
`max_consecutive_skips` skipped steps in a row stop the run with `TrainingStopped`, before any bad update
reached the weights, so the checkpoints written so far stay good.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from qformer.folders import FROZEN_PREFIX, LM_PREFIX
from qformer.lora import is_adapter_key
from stages.distributed import gather_objects, world
from stages.train.optim import configure_adamw
from stages.train.resume import capture_rng, restore_rng

log = logging.getLogger(__name__)

SKIPPED_REPORT_EVERY = 500  # steps


def checkpoint_callbacks(metric: str | None, best_filename: str, every_n_steps: int = 0) -> list:
    """`last.ckpt` always (every epoch end and validation, and every `every_n_steps` steps when given), and the best
    checkpoint by `metric` (higher is better) when the run validates; that one is saved only after a validation, so a
    run too short to validate gives no warning."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=every_n_steps or None)]
    if metric is not None:
        callbacks.append(ModelCheckpoint(monitor=metric, mode="max", filename=best_filename, auto_insert_metric_name=False,
                                         save_on_train_epoch_end=False))
    return callbacks


def check_vision_options(train_vision: bool, vision_lr_decay: float, vision_lr_scale: float = 1.0) -> None:
    if not 0 < vision_lr_decay <= 1:
        raise ValueError(f"model.vision_lr_decay must be in (0, 1] (1: no layer-wise decay; BLIP-2 uses 0.95), got {vision_lr_decay}")
    if not vision_lr_scale > 0:
        raise ValueError(f"model.vision_lr_scale must be above 0 (1: the encoder at the Q-Former's lr), got {vision_lr_scale}")
    for option, value in (("vision_lr_decay", vision_lr_decay), ("vision_lr_scale", vision_lr_scale)):
        if value != 1 and not train_vision:
            raise ValueError(f"model.{option} applies to a trained image encoder: set model.train_vision: true (or drop it)")


class TrainingStopped(RuntimeError):
    """Training cannot go on usefully (diverged, or nothing to learn from); the message says why."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value is finite, from one fp32 norm per tensor computed in one call.

    A norm is finite exactly when its tensor is (short of values near 1e19, which would make gradient clipping's total
    norm infinite anyway). An isfinite().all() per gradient took 2.5 ms a step on 2 CPU cores, 4 % of the demo's
    stand-in stage-2 step; this takes 0.3 ms.
    """
    return bool(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).isfinite().all())


class TrainingSkeleton(pl.LightningModule):
    """Subclasses build `self.model` and implement `training_loss(batch)` and `validation_step`."""

    STEP_COUNTERS = ("skipped_steps", "consecutive_skips", "applied_steps", "last_skip_reason")

    def __init__(self, max_consecutive_skips: int = 25, compile: bool = False, gradient_checkpointing: bool = False,
                 save_every_n_steps: int = 0, train_vision: bool = False, vision_lr_decay: float = 1.0,
                 vision_lr_scale: float = 1.0):
        super().__init__()
        check_vision_options(train_vision, vision_lr_decay, vision_lr_scale)
        self.train_vision = train_vision
        self.vision_lr_decay = vision_lr_decay
        self.vision_lr_scale = vision_lr_scale
        if max_consecutive_skips < 0:
            raise ValueError(f"model.max_consecutive_skips must be >= 0 (0: never stop), got {max_consecutive_skips}")
        if save_every_n_steps < 0:
            raise ValueError(f"model.save_every_n_steps must be >= 0 (0: at epoch ends and validations only), got {save_every_n_steps}")
        self.save_every_n_steps = save_every_n_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.compile_qformer = compile
        self.gradient_checkpointing = gradient_checkpointing
        self.skipped: dict[str, list[str]] = {"train": [], "val": []}  # unreadable images, reported per epoch
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.applied_steps = 0
        self.last_skip_reason = ""
        self.validation_batches = 0
        self._step_problem: str | None = None  # why the current step may not be applied
        self._step_loss: torch.Tensor | None = None
        self._step_samples: list[int] = []
        self._total_steps: int | None = None
        self._rng_to_restore: dict | None = None  # a resumed run's RNG states, set just before its first step

    # --- training steps ---------------------------------------------------------------------------------------
    def training_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.skipped["train"] += batch.get("skipped", [])
        self._step_samples = batch.get("sample_ids", torch.empty(0)).tolist()
        self._step_problem, self._step_loss = None, None
        if self._any_rank(not self.has_images(batch)):  # then no rank may enter the losses' cross-rank gathers
            self._step_problem = "no readable image in the batch" if not self.has_images(batch) else "another process's batch"
            return self._zero_loss()
        loss = self.training_loss(batch)
        self._step_loss = loss.detach()
        return loss

    @staticmethod
    def has_images(batch: dict) -> bool:
        return "pixel_values" in batch

    def _zero_loss(self) -> torch.Tensor:
        """A loss of exactly zero that still reaches every trainable parameter, so DDP's gradient hooks all fire."""
        return sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)

    def _any_rank(self, flag: bool) -> bool:
        return self._sum_over_ranks(float(flag)) > 0

    def _sum_over_ranks(self, value: float) -> float:
        if self.trainer.world_size == 1:
            return value
        return float(self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="sum"))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Apply the step only when every process has a finite loss and finite gradients; otherwise drop the gradients."""
        if self._step_problem is None and self._step_loss is not None and not torch.isfinite(self._step_loss):
            self._step_problem = f"loss is {self._step_loss.item()}"
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self._step_problem is None and grads and not all_finite(grads):
            self._step_problem = "non-finite gradient"
        if not self._any_rank(self._step_problem is not None):
            self.consecutive_skips = 0
            self.applied_steps += 1
        else:
            for p in self.model.parameters():
                p.grad = None  # AdamW leaves parameters without a gradient untouched (no decay, no moment update)
            self._skip_step(self._step_problem or "a non-finite loss or gradient on another process")
        self.log("train/skipped_steps", float(self.skipped_steps), reduce_fx="max")

    def _skip_step(self, reason: str) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.last_skip_reason = reason
        log.warning("step %d skipped on rank %d: %s; samples %s", self.global_step, world()[0], reason, self._describe_samples())
        limit = self.max_consecutive_skips
        if limit and self.consecutive_skips >= limit:
            raise TrainingStopped(
                f"stopped after {self.consecutive_skips} skipped steps in a row (last: {reason}); no update was applied by "
                f"any of them, so the weights and the checkpoints saved so far are the last good ones. Lower the learning "
                f"rate, check the data, or raise model.max_consecutive_skips"
            )

    def _describe_samples(self, limit: int = 8) -> str:
        """The step's sample ids, with their image paths when the data module can tell."""
        ids = self._step_samples[:limit]
        dataset = getattr(getattr(self.trainer, "datamodule", None), "train_set", None)
        if dataset is not None and hasattr(dataset, "samples"):
            named = [f"{i} ({dataset.samples[i][0]})" for i in ids if 0 <= i < len(dataset.samples)]
        else:
            named = [str(i) for i in ids]
        return ", ".join(named) + (" ..." if len(self._step_samples) > limit else "") if named else "(none readable)"

    # --- options for big runs, optimiser and checkpoints ----------------------------------------------------------
    def configure_model(self) -> None:
        """`model.gradient_checkpointing` and `model.compile`, applied to the Q-Former once `self.model` exists;
        checkpointing covers a trained image encoder's blocks too (a frozen one stores no activations for a backward).

        `Module.compile` compiles in place: parameter names, and so checkpoints and exports, do not change.
        """
        qformer = self.model.qformer
        qformer.gradient_checkpointing = self.gradient_checkpointing
        if self.model.visual_encoder.trainable:
            self.model.visual_encoder.use_gradient_checkpointing(self.gradient_checkpointing)
        if self.compile_qformer and getattr(qformer, "_compiled_call_impl", None) is None:
            qformer.compile()

    def configure_optimizers(self):
        hp = self.hparams
        # Lightning refuses to clip gradients under mixed precision for an optimiser that unscales them itself, as a
        # fused one declares it does: with both, the default AdamW is used.
        clipped_mixed = "mixed" in str(self.trainer.precision) and bool(self.trainer.gradient_clip_val)
        return configure_adamw(
            self.model, hp.lr, hp.min_lr, hp.weight_decay, hp.warmup_steps, self._planned_steps, fused=not clipped_mixed,
            head_start=self.optimizer_head_start(), vision_lr_decay=self.vision_lr_decay,
            vision_lr_scale=self.vision_lr_scale,
        )

    def optimizer_head_start(self):
        """A part that trains alone first (`stages.train.optim.HeadStart`), or None: stage 2's projection warm-up."""

    def _planned_steps(self) -> int:
        """Asked when the cosine begins, not here: estimating builds the data loader before a resume restored its
        position (Lightning issue #20550), and the estimate does not change."""
        if self._total_steps is None:
            self._total_steps = int(self.trainer.estimated_stepping_batches)
        return self._total_steps

    def _rebuildable_prefixes(self) -> tuple[str, ...]:
        """Frozen towers that are rebuilt from their own files, so not copied into every checkpoint.

        A randomly initialised tower (no file) is kept: it could not be rebuilt; so are a trained one and a LoRA
        adapter on the LM.
        """
        config = self.model.config
        prefixes = []
        if config.vision_config.weights_path is not None and not self.model.visual_encoder.trainable:
            prefixes.append("model." + FROZEN_PREFIX)
        if config.language_model is not None and config.language_model.path is not None:
            prefixes.append("model." + LM_PREFIX)
        return tuple(prefixes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Trainable weights only (see `_rebuildable_prefixes`), every process's RNG states and the step counters."""
        drop = self._rebuildable_prefixes()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not (drop and k.startswith(drop)) or is_adapter_key(k)}  # a LoRA adapter trains
        checkpoint["rng_states"] = gather_objects(capture_rng())  # every process calls this hook: a collective is safe
        checkpoint["step_counters"] = {name: getattr(self, name) for name in self.STEP_COUNTERS}
        # The data's image size, when the encoder was resized to it: a module rebuilt from the hyper-parameters (resume,
        # `qformer export`) is made at its start's size and resized below before the weights are loaded.
        checkpoint["image_size"] = self.model.visual_encoder.config.image_size

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "image_size" in checkpoint:
            self.model.visual_encoder.resize(checkpoint["image_size"], "the checkpoint's image size")
        frozen = ("model." + FROZEN_PREFIX, "model." + LM_PREFIX)
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(frozen):
                state.setdefault(key, value)
        for name, value in checkpoint.get("step_counters", {}).items():
            setattr(self, name, value)
        states = checkpoint.get("rng_states")
        if states:
            rank, size = world()
            if size != len(states):
                log.warning("resuming %d process(es) from a checkpoint of %d: the RNG streams differ from an uninterrupted "
                            "run's", size, len(states))
            self._rng_to_restore = states[rank % len(states)]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Unreadable samples are named every SKIPPED_REPORT_EVERY steps too: a web-scale epoch is long."""
        if self.global_step % SKIPPED_REPORT_EVERY == 0:
            self._report_skipped("train")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # here, after the sanity check and the loader's start: as at the save
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def text_encoder(self) -> tuple:
        """(captions, keys -> the batch's text tensors; tokens per caption; the setting that gives that number):
        what the data workers tokenize with, so that a caption is tokenized once, by the tokenizer the model uses."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is None:
            return
        if hasattr(data, "use_text_encoder"):
            data.use_text_encoder(*self.text_encoder())
        data.check_encoder(self.model.visual_encoder)  # the image size, or a feature cache's encoder

    # --- unreadable images ----------------------------------------------------------------------------------------
    def _report_skipped(self, split: str) -> None:
        skipped = self.skipped[split]
        self.log(f"{split}/skipped_images", torch.tensor(float(len(skipped)), device=self.device), reduce_fx="sum", sync_dist=True)
        if skipped:
            images = list(dict.fromkeys(skipped))  # each image named once, however many captions it has
            shown = ", ".join(images[:5]) + (" ..." if len(images) > 5 else "")
            log.warning("%s epoch %d: skipped %d sample(s) of %d unreadable image(s) on rank %d: %s", split, self.current_epoch,
                        len(skipped), len(images), world()[0], shown)
        self.skipped[split] = []

    def on_train_epoch_end(self) -> None:
        """Runs before ModelCheckpoint's own epoch-end save: a run that learnt nothing leaves no checkpoint."""
        self._report_skipped("train")
        if self.applied_steps == 0 and self.skipped_steps > 0:
            raise TrainingStopped(
                f"no step was applied: all {self.skipped_steps} training steps were skipped (last: {self.last_skip_reason}; "
                f"the warnings above name the samples)"
            )

    def on_validation_epoch_start(self) -> None:
        self.validation_batches = 0

    def note_validation_batch(self, batch: dict) -> bool:
        """Count the batch's unreadable images; True when it has images to validate on."""
        self.skipped["val"] += batch.get("skipped", [])
        usable = self.has_images(batch)
        self.validation_batches += usable
        return usable

    def on_validation_epoch_end(self) -> None:
        unreadable = list(self.skipped["val"])
        self._report_skipped("val")
        if self._sum_over_ranks(float(self.validation_batches)) == 0 and self._sum_over_ranks(float(len(unreadable))) > 0:
            raise TrainingStopped(f"data.val: no readable image in the validation split ({'; '.join(unreadable[:3]) or 'on another process'})")
