"""Image-caption training data: the Lightning data module over annotation files, task mixtures of them
(`stages.data.mixture`), feature caches or shards; its dataset and batches are `stages.data.dataset`'s.

Annotation files are read by `stages.data.annotations` (instruction and VQA files by `stages.data.instructions`); an
image that cannot be read is skipped, counted and reported (or fails at once with `strict`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from qformer.transforms import eval_transform, train_transform
from stages.data.dataset import CaptionDataset, Collate, first_captions
from stages.data.dataset import caption_samples  # noqa: F401 (imported from here)
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit
from stages.data.instructions import load_templates, read_samples
from stages.data.mixture import (MixtureSampler, ShardMixture, describe_mixture, mixture_probabilities, parse_mixture,
                                 shard_mixture)
from stages.data.sampling import ResumableSampler
from stages.data.text import BertText
from stages.data.webdataset import ShardLoader, ShardStream, counted_samples, epoch_batches, expand_shards, is_shard_spec


@dataclass
class ShardSplit:
    """A split given as webdataset shards (`stages.data.webdataset`): its files, and its samples per epoch when known."""

    urls: list[str]
    samples: int | None
    parts: list[list[str]] | None = None  # a task mixture's shards, part by part

    def __len__(self) -> int:
        return self.samples or 0


class CaptionDataModule(pl.LightningDataModule):
    """Image-caption data for stage 1 and stage 2.

    Args:
        train: annotation file for training, or webdataset shards in img2dataset's layout: a spec such as
            `/data/cc3m/{00000..00331}.tar`, several joined by `::` (see stages/shards.py); or a task mixture, a list
            of them, each a name or {path, weight} (`stages.data.mixture`): without weights each is drawn with
            p ~ sqrt(its size). Caption, VQA and instruction files (`stages.data.instructions`) may be mixed.
        templates: YAML or JSON file of task templates (caption, vqa) that make caption and VQA files instruction
            data, drawn per sample (e.g. configs/instruct/templates.yaml). Without it captions train as captions.
        val: annotation file or shard spec for validation (optional).
        image_root: folder the annotation paths are relative to (not needed with `features` or shards).
        image_size: the images' size in pixels; an image encoder made for another size is resized to it (its position
            embeddings resampled, as BLIP-2's fine-tuning does 224 -> 364 px).
        tokenizer_dir: BERT tokenizer folder (vocab.txt / tokenizer.json), for the data module on its own; in training
            the training module tokenizes with its model's tokenizer (stage 2: the LM's).
        max_length: text tokens per caption; by default the model's (stage 1: `max_text_length` of its config, stage 2:
            `model.max_text_length`). A different value is refused: the model's setting is the one read everywhere.
        max_words: captions are cut to this many words before tokenizing (LAVIS: 50).
        hflip: random horizontal flips in training (turn off when captions say left/right).
        crop_scale: RandomResizedCrop's area range in training (LAVIS: 0.5 to 1; [1, 1] when captions say small/large).
        strict: fail on the first unreadable image instead of skipping it.
        max_image_pixels: images whose header declares more pixels are skipped before decoding (null: no limit).
        allow_outside_root: read annotation paths that lead outside `image_root` (absolute, `..`, symbolic links).
        features: a feature cache folder (`qformer cache-features`) holding every image of `train` (and of `val`,
            unless `val_features` is given): no image is read; each training sample takes one of the cache's
            training views at random (its eval view when it has none), validation the eval view.
        val_features: the validation split's feature cache, when it is not `features` (e.g. one of eval views only).
        val_captions_per_image: validate on the first this many captions of each image (default: all of them), e.g.
            1 for a large LM whose validation over COCO's five captions per image would take a fifth of the run.
        seed: the training order's and augmentations' seed (each epoch's shuffle, each sample's crop, flip or cached
            view); by default the run's seed (`seed_everything`). A resumed run keeps its checkpoint's.
        train_samples: samples in a training epoch from shards (default: the sum of the shards' `_stats.json`
            successes).
        resampled: shards: draw training shards with replacement (open_clip's `--dataset-resampled`) instead of
            splitting them among processes and workers, each of which then needs at least one shard.
        shuffle_buffer: shards: samples in each training worker's shuffle buffer.
        caption_key: shards: the caption's key in a sample's `.json` (used when it has no `.txt`).
    """

    def __init__(
        self,
        train: str | list[str | dict],
        image_root: str | None = None,
        val: str | None = None,
        image_size: int = 224,
        tokenizer_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        max_length: int | None = None,
        max_words: int = 50,
        hflip: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allow_outside_root: bool = False,
        features: str | None = None,
        val_features: str | None = None,
        seed: int | None = None,
        train_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        caption_key: str = "caption",
        templates: str | None = None,
        val_captions_per_image: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encode_text = None  # set by the training module (`use_text_encoder`), or from tokenizer_dir
        self.data_seed = seed
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches trained) of the checkpoint resumed from
        self.resume_step = 0  # the global step of the checkpoint resumed from
        self.train_sampler: ResumableSampler | None = None
        self.mixture: tuple[list[int], list[float]] | None = None  # (samples, probability) of each part of a mixture
        self.instruction_files: list[str] = []  # VQA and instruction files: only an instruction-taking text encoder reads them
        for name in ("batch_size", "max_length", "max_words", "image_size", "val_captions_per_image"):
            if getattr(self.hparams, name) is not None and getattr(self.hparams, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self.hparams, name)}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        check_pixel_limit(max_image_pixels, "data.max_image_pixels")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.features is None and hp.val_features is not None:
            raise ValueError("data.val_features: give data.features too (the training split's feature cache)")
        self.parts = parse_mixture(hp.train)
        self.train_spec = self.parts[0].path if len(self.parts) == 1 else None  # a single file or spec: read as always
        if hp.features is not None and (any(is_shard_spec(p.path) for p in self.parts) or is_shard_spec(hp.val)):
            raise ValueError("data.features: a feature cache is read with annotation files, not with shards (data.train / data.val)")
        if hp.val_captions_per_image is not None and hp.val is not None and is_shard_spec(hp.val):
            raise ValueError("data.val_captions_per_image: shards hold one caption per sample; use it with an annotation file")
        reads_folder = hp.features is None and not (is_shard_spec(self.parts[0].path) and (hp.val is None or is_shard_spec(hp.val)))
        if reads_folder and hp.image_root is None:
            raise ValueError("data.image_root: give the image folder the annotation paths are relative to (or data.features)")
        if reads_folder and not Path(hp.image_root).is_dir():  # before a whole epoch of "file not found"
            raise FileNotFoundError(f"data.image_root: image folder not found: {hp.image_root}")
        if self.data_seed is None:
            self.data_seed = torch.initial_seed() % 2**31  # the run's seed after seed_everything
        if self.encode_text is None and hp.tokenizer_dir is not None:
            from qformer.bert import load_tokenizer

            self.encode_text = BertText(load_tokenizer(hp.tokenizer_dir), hp.max_length or 32)
        self.templates = None if hp.templates is None else load_templates(hp.templates)
        self.instruction_files, self.mixture = [], None
        if hp.features is None:
            self.caches = []
            self.train_set = self._train_dataset(train_transform(hp.image_size, hp.hflip, tuple(hp.crop_scale)))
            self.val_set = None if hp.val is None else self._dataset(hp.val, eval_transform(hp.image_size))
        else:
            self._cached_datasets()
        world = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit") and len(self.train_set) < hp.batch_size * world:
            raise ValueError(f"data.train: {hp.train} has {len(self.train_set)} image-caption pairs, fewer than one batch "
                             f"(data.batch_size {hp.batch_size} x {world} process(es)); lower data.batch_size")
        if stage in (None, "fit") and self.mixture is not None:
            self._report_mixture()

    def _cached_datasets(self) -> None:
        from stages.data.feature_cache import FeatureCache

        hp = self.hparams
        train_cache = FeatureCache(hp.features, "data.features")
        train_cache.check_transform(hp.hflip, hp.crop_scale, hp.image_size)
        val_cache = train_cache if hp.val_features is None else FeatureCache(hp.val_features, "data.val_features")
        self.caches = [train_cache] + ([val_cache] if val_cache is not train_cache else [])
        self.train_set = self._cached_dataset([p.path for p in self.parts], train_cache, train=True)
        self.val_set = None if hp.val is None else self._cached_dataset([hp.val], val_cache, train=False)

    def _cached_dataset(self, files: list[str], cache, train: bool):
        from stages.data.feature_cache import CachedCaptionDataset

        samples = self._samples(files, remember=train) if train else self._val_samples(files)
        cache.require(list(dict.fromkeys(image for image, _, _ in samples)), ", ".join(files))
        return CachedCaptionDataset(samples, cache, train, self.hparams.strict)

    def _samples(self, files: list[str], remember: bool) -> list:
        """The samples of the files, concatenated; for the training split, the mixture's sizes and probabilities."""
        hp = self.hparams
        image_index: dict[str, int] = {}
        tasks, per_file = zip(*(read_samples(file, self.templates, image_index, hp.max_words, hp.allow_outside_root) for file in files))
        self.instruction_files += [file for file, task in zip(files, tasks) if task != "caption"]
        if remember and len(files) > 1:
            sizes = [len(samples) for samples in per_file]
            self.mixture = sizes, mixture_probabilities(self.parts, sizes)
        return [sample for samples in per_file for sample in samples]

    def _val_samples(self, files: list[str]) -> list:
        """The validation samples: with `val_captions_per_image`, the first that many of each image."""
        return first_captions(self._samples(files, remember=False), self.hparams.val_captions_per_image)

    def _train_dataset(self, transform) -> CaptionDataset | ShardSplit:
        if self.train_spec is not None and is_shard_spec(self.train_spec):
            return self._dataset(self.train_spec, transform)
        hp = self.hparams
        if is_shard_spec(self.parts[0].path):
            urls, sizes, samples = shard_mixture(self.parts, hp.train_samples)
            self.mixture = sizes, mixture_probabilities(self.parts, sizes)
            return ShardSplit([url for part in urls for url in part], samples, urls)
        samples = self._samples([p.path for p in self.parts], remember=True)
        return CaptionDataset(None, hp.image_root, transform, hp.max_words, hp.strict, hp.max_image_pixels,
                              hp.allow_outside_root, samples=samples)

    def _report_mixture(self) -> None:
        """The effective ratios: on stderr from the first process, and as `data/mixture/<i>_<file>` in the run's logs."""
        sizes, probabilities = self.mixture
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if rank == 0:
            print(describe_mixture(self.parts, sizes, probabilities), file=sys.stderr)
        logger = getattr(self.trainer, "logger", None)
        if logger is not None:
            logger.log_metrics({f"data/mixture/{i}_{Path(p.path).stem}": q for i, (p, q) in enumerate(zip(self.parts, probabilities))},
                               step=0)

    def check_encoder(self, encoder) -> None:
        """The model's encoder must be the one the feature caches were made with, or take this data's image size: one made
        for another size is resized (its position embeddings resampled), or refused in one line. A trained encoder
        reads images: cached features would be those of its first weights."""
        if self.hparams.features is not None and encoder.trainable:
            raise ValueError(f"data.features: the image encoder trains (model.train_vision: true), so the cached features of "
                             f"{self.hparams.features} would be stale; drop data.features and give data.image_root")
        if self.hparams.features is None:
            encoder.resize(self.hparams.image_size, "data.image_size")
            return
        for cache in self.caches:
            cache.check_encoder(encoder)

    def _dataset(self, annotations: str, transform) -> CaptionDataset | ShardSplit:
        hp = self.hparams
        if is_shard_spec(annotations):
            option = "data.train" if annotations == self.train_spec else "data.val"
            urls = expand_shards(annotations, option)
            samples = hp.train_samples or counted_samples(urls)
            if option == "data.train" and samples is None:
                raise ValueError(f"data.train_samples: give the samples per epoch (a shard of {annotations} has no _stats.json)")
            return ShardSplit(urls, samples)
        samples = self._val_samples([annotations])  # train annotations go through _train_dataset
        return CaptionDataset(None, hp.image_root, transform, hp.max_words, hp.strict, hp.max_image_pixels, hp.allow_outside_root,
                              samples=samples)

    def use_text_encoder(self, encode_text, max_length: int, setting: str) -> None:
        """The training module's text encoder; `max_length` is its model's `setting`, which data.max_length must equal."""
        if self.hparams.max_length is not None and self.hparams.max_length != max_length:
            raise ValueError(f"data.max_length is {self.hparams.max_length} but the model's {setting} is {max_length}: "
                             f"leave data.max_length out (the model's setting is used) or make them equal")
        self.encode_text = encode_text

    def _collate(self) -> Collate:
        if self.encode_text is None:
            raise ValueError("data.tokenizer_dir: give a BERT tokenizer folder (the training module sets its own when used with one)")
        if self.instruction_files and not getattr(self.encode_text, "takes_instructions", False):
            raise ValueError(f"data.train: {self.instruction_files[0]} holds instructions (a VQA or instruction file); this "
                             f"stage trains on captions only (stage 1): give it caption files")
        return Collate(self.encode_text)

    def _loader(self, dataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate(),
            drop_last=sampler is not None,  # equal batches on every rank for the global-batch losses
            persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator().manual_seed(self.data_seed or 0),  # worker seeds, not a draw from the run's RNG
        )

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _shard_loader(self, split: ShardSplit, train: bool) -> ShardLoader:
        """Batches from shards (`stages.data.webdataset`); a resumed run's training stream is a fresh draw (restart = its step)."""
        hp = self.hparams
        rank, world = self._rank_and_world()
        workers = hp.num_workers if train else 0  # validation: each process reads every name, decodes its share
        transform = train_transform(hp.image_size, hp.hflip, tuple(hp.crop_scale)) if train else eval_transform(hp.image_size)
        batches = epoch_batches(split.samples, hp.batch_size, world, workers, "data.train") if train else None

        def stream_of(urls: list[str]) -> ShardStream:
            return ShardStream(urls, transform, self._collate(), hp.batch_size, rank, world, workers, self.data_seed, train,
                               batches, hp.resampled, hp.shuffle_buffer, hp.caption_key, hp.max_words, hp.max_image_pixels)

        if train and split.parts is not None:  # a mixture: each batch from one part's stream
            stream = ShardMixture([stream_of(urls) for urls in split.parts], self.mixture[1], batches)
        else:
            stream = stream_of(split.urls)
        stream.restart = self.resume_step if train else 0
        return ShardLoader(stream, lambda: self.trainer.current_epoch if self.trainer is not None else 0, workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `ResumableSampler`: one share per process, and a resumed run starts where its checkpoint was."""
        if isinstance(self.train_set, ShardSplit):
            return self._shard_loader(self.train_set, train=True)
        rank, world = self._rank_and_world()
        self.train_set.seed = self.data_seed
        if self.mixture is None:
            self.train_sampler = ResumableSampler(self.train_set, self.hparams.batch_size, world, rank, self.data_seed)
        else:
            self.train_sampler = MixtureSampler(self.train_set, self.hparams.batch_size, world, rank, self.data_seed, *self.mixture)
        self.train_sampler.resume_at = self.resume_at
        return self._loader(self.train_set, self.train_sampler)

    def val_dataloader(self) -> DataLoader | list:
        if isinstance(self.val_set, ShardSplit):
            return self._shard_loader(self.val_set, train=False)
        return [] if self.val_set is None else self._loader(self.val_set)

    # --- the data position in checkpoints (see stages.train.resume) ---------------------------------------------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or self.data_seed is None:
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"seed": self.data_seed, "epoch": trainer.current_epoch, "batches": batches, "step": trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.data_seed = state["seed"]
        self.resume_at = (state["epoch"], state["batches"])
        self.resume_step = state.get("step", 0)
        if self.train_sampler is not None:
            self.train_sampler.resume_at = self.resume_at
