"""The frozen-feature cache: `qformer cache-features`, training and evaluation from it, refusals, resume, broken images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.config import preset
from qformer.folders import save_stage1
from qformer.losses import stage1_losses
from qformer.stage1 import Stage1Model
from qformer.transforms import eval_transform, train_transform
from stages.cli import main
from stages.data.captions import Collate
from stages.data.feature_cache import MANIFEST, CachedCaptionDataset, FeatureCache, encoder_identity, load_encoder
from stages.data.images import read_rgb
from stages.data.synthetic import make_dataset
from stages.data.text import BertText
from stages.tools import cache_features as caching

from broken_files import write_broken_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache_data")
    make_dataset(folder, num_images=40, seed=0)  # 32 train (one caption per entry), 4 val, 4 test (caption lists)
    return folder


def cache(data: Path, out: Path, *extra: str, files=("train.json",), config="tiny") -> Path:
    argv = ["cache-features", "--config", str(config), "--data", *[str(data / f) for f in files], "--images", str(data),
            "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def images_of(data: Path, split: str) -> list[str]:
    return list(dict.fromkeys(e["image"] for e in json.loads((data / split).read_text())))


# --- what is stored ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 0), ("fp16", 2e-3), ("bf16", 1e-2)])
def test_eval_view_is_the_encoders_output_and_training_views_differ(data, tmp_path, dtype, tolerance):
    folder = cache(data, tmp_path / "c", "--views", "3", "--dtype", dtype, files=("val.json",))
    stored = np.load(folder / "features-00000.npy", mmap_mode="r")
    assert stored.dtype == {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[dtype]
    assert stored.shape[:2] == (4, 4)  # 4 images x (eval view + 3 training views)
    features = FeatureCache(folder)
    encoder = load_encoder("tiny", seed=0)
    for path in images_of(data, "val.json"):
        pixels = eval_transform(32)(read_rgb(data / path))[None]
        expected = encoder(pixels)[0]  # (N, width), before ln_vision
        tokens = features.tokens(path, 0)
        assert tokens.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        torch.testing.assert_close(tokens.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
        views = [features.tokens(path, v).float() for v in (0, 1, 2, 3)]
        assert all(not torch.equal(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))


def test_one_view_means_the_eval_view_for_training_too(data, tmp_path):
    folder = cache(data, tmp_path / "c", files=("val.json",))
    features = FeatureCache(folder)
    assert np.load(folder / "features-00000.npy", mmap_mode="r").shape[1] == 1
    assert features.views == [0]
    samples = [(path, "a caption", i) for i, path in enumerate(images_of(data, "val.json"))]
    dataset = CachedCaptionDataset(samples, features, train=True)
    assert torch.equal(dataset[0]["pixel_values"], features.tokens(samples[0][0], 0))


def test_training_draws_among_the_training_views_and_validation_takes_the_eval_view(data, tmp_path):
    features = FeatureCache(cache(data, tmp_path / "c", "--views", "4", files=("val.json",)))
    path = images_of(data, "val.json")[0]
    train = CachedCaptionDataset([(path, "a caption", 0)], features, train=True)
    views = [features.tokens(path, v) for v in range(5)]
    drawn = set()
    for epoch in range(40):  # the training sampler's keys: (epoch, index)
        tokens = train[(epoch, 0)]["pixel_values"]
        assert torch.equal(train[(epoch, 0)]["pixel_values"], tokens)  # the same key, the same view (resumable)
        drawn.add(next(v for v in range(5) if torch.equal(tokens, views[v])))
    assert drawn == {1, 2, 3, 4}
    val = CachedCaptionDataset([(path, "a caption", 0)], features, train=False)
    assert torch.equal(val[0]["pixel_values"], features.tokens(path, 0))


def test_manifest_records_the_encoder_images_and_sizes(data, tmp_path, capsys):
    folder = cache(data, tmp_path / "c", "--views", "2", files=("train.json", "val.json"))
    printed = capsys.readouterr().out
    manifest = json.loads((folder / MANIFEST).read_text())
    encoder = load_encoder("tiny", seed=0)
    assert manifest["encoder"] == encoder_identity(encoder)
    assert manifest["views"] == {"eval": 0, "train": 2, "stored": 3}
    assert manifest["transform"]["train"] == {"kind": "RandomResizedCrop(bicubic) + RandomHorizontalFlip", "crop_scale": [0.5, 1.0], "hflip": True}
    assert [i["image"] for i in manifest["images"]] == images_of(data, "train.json") + images_of(data, "val.json")
    assert manifest["images"][0]["image_id"] == "0"
    tokens, width = manifest["token_shape"]
    assert manifest["bytes_per_image"] == 3 * tokens * width * 2
    assert f"{manifest['bytes_per_image']:,} bytes per image" in printed and f"{manifest['total_bytes']:,} bytes in all" in printed


def test_one_caption_per_entry_and_caption_lists_cache_the_same_images(data, tmp_path):
    entries = json.loads((data / "val.json").read_text())
    per_caption = [{"image": e["image"], "caption": c, "image_id": e["image_id"]} for e in entries for c in e["caption"]]
    (tmp_path / "per_caption.json").write_text(json.dumps(per_caption))
    a = FeatureCache(cache(data, tmp_path / "a", files=("val.json",)))
    b = FeatureCache(cache(data, tmp_path / "b", files=(str(tmp_path / "per_caption.json"),)))
    assert a.manifest["images"] == b.manifest["images"] and len(a.manifest["images"]) == 4
    for path in images_of(data, "val.json"):
        assert torch.equal(a.tokens(path, 0), b.tokens(path, 0))


# --- the encoder must be the cache's ---------------------------------------------------------------------
def test_a_model_with_another_encoder_is_refused_naming_the_field(data, tmp_path):
    features = FeatureCache(cache(data, tmp_path / "c", files=("val.json",)))
    features.check_encoder(load_encoder("tiny", seed=0))  # the same seed builds the same random encoder
    with pytest.raises(ValueError, match=r"weights_sha256 is .* there, .* in this model.*--seed S"):
        features.check_encoder(load_encoder("tiny", seed=1))
    config = preset("tiny")
    config.vision_config.drop_last_blocks = 0
    config.save(tmp_path / "deeper.json")
    with pytest.raises(ValueError, match="drop_last_blocks is 1 there, 0 in this model"):
        features.check_encoder(load_encoder(str(tmp_path / "deeper.json"), seed=0))
    config = preset("tiny")
    config.vision_config.image_size = 48
    config.save(tmp_path / "larger.json")
    with pytest.raises(ValueError, match="image_size is 32 there, 48 in this model"):
        features.check_encoder(load_encoder(str(tmp_path / "larger.json"), seed=0))


def test_the_cache_of_an_export_matches_its_model(data, tmp_path):
    torch.manual_seed(5)
    save_stage1(Stage1Model(preset("tiny")), load_tokenizer(data), tmp_path / "export")
    features = FeatureCache(cache(data, tmp_path / "c", files=("val.json",), config=tmp_path / "export"))
    from qformer.folders import load_stage1

    features.check_encoder(load_stage1(tmp_path / "export")[0].visual_encoder)
    with pytest.raises(ValueError, match="weights_sha256"):
        features.check_encoder(load_encoder("tiny", seed=0))


# --- training and evaluation from the cache -------------------------------------------------------------
def test_losses_from_the_cached_eval_view_equal_losses_from_pixels(data, tmp_path):
    features = FeatureCache(cache(data, tmp_path / "c", "--dtype", "fp32", files=("val.json",)))
    torch.manual_seed(0)  # what `cache-features --seed 0` builds the encoder with, as `stage1 fit --seed_everything 0`
    model = Stage1Model(preset("tiny")).eval()
    features.check_encoder(model.visual_encoder)
    tokenizer = load_tokenizer(data)
    entries = json.loads((data / "val.json").read_text())
    pixels = torch.stack([eval_transform(32)(read_rgb(data / e["image"])) for e in entries])
    tokens = torch.stack([features.tokens(e["image"], 0) for e in entries])
    text = tokenizer([e["caption"][0] for e in entries], padding="max_length", max_length=32, return_tensors="pt")
    results = []
    for images in (pixels, tokens):
        torch.manual_seed(1)  # the same hard negatives
        results.append(stage1_losses(model, images, text["input_ids"], text["attention_mask"], torch.arange(4), tokenizer.bos_token_id))
    for name in ("itc", "itm", "itg"):
        torch.testing.assert_close(getattr(results[0], name), getattr(results[1], name), rtol=1e-5, atol=1e-6)
    assert results[0].itc > 0


def fit(stage: str, data: Path, features: Path, root: Path, *extra: str) -> int:
    config = ROOT / "configs" / stage / "tiny.yaml"
    argv = [stage, "fit", "--config", str(config), "--data.train", str(data / "train.json"), "--data.val", str(data / "val.json"),
            "--data.image_root", str(root / "no_images_here"), "--data.features", str(features), "--data.batch_size", "8",
            "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    return main(argv)


def test_stage1_and_stage2_fit_from_the_cache_without_reading_an_image(data, tmp_path, capsys):
    features = cache(data, tmp_path / "cache", "--views", "2", "--no-hflip", files=("train.json", "val.json"))
    stage1 = tmp_path / "stage1"
    assert fit("stage1", data, features, stage1, "--model.tokenizer", str(data), "--data.num_workers", "2") == 0
    assert main(["export", str(stage1 / "last.ckpt"), "--out", str(tmp_path / "export1")]) == 0
    stage2 = tmp_path / "stage2"
    assert fit("stage2", data, features, stage2, "--model.stage1", str(tmp_path / "export1"),
               "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder")) == 0
    assert (stage2 / "last.ckpt").is_file()
    capsys.readouterr()
    # A run that builds another random encoder (another seed) is refused before training, in one line.
    assert fit("stage1", data, features, tmp_path / "other", "--model.tokenizer", str(data), "--seed_everything", "1") == 2
    assert "data.features: the cache" in capsys.readouterr().err
    # Training views drawn with other transform settings than this run's are refused too.
    assert fit("stage1", data, features, tmp_path / "flip", "--model.tokenizer", str(data), "--data.hflip", "true") == 2
    assert "hflip" in capsys.readouterr().err


def test_a_fit_that_trains_the_encoder_refuses_the_cache_in_one_line(data, tmp_path, capsys):
    features = cache(data, tmp_path / "cache", "--views", "2", "--no-hflip", files=("train.json", "val.json"))
    assert fit("stage1", data, features, tmp_path / "run", "--model.tokenizer", str(data), "--model.train_vision", "true") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qformer stage1: error: data.features: the image encoder trains (model.train_vision: true)")
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "run" / "last.ckpt").exists()


def test_eval_retrieval_from_the_cache_equals_eval_from_images(data, tmp_path):
    torch.manual_seed(0)
    save_stage1(Stage1Model(preset("tiny")), load_tokenizer(data), tmp_path / "export")
    features = cache(data, tmp_path / "c", "--dtype", "fp32", files=("val.json", "test.json"), config=tmp_path / "export")
    common = ["eval", "retrieval", "--model", str(tmp_path / "export"), "--data", str(data / "test.json"), "--k-test", "4", "--no-progress"]
    assert main([*common, "--images", str(data), "--json", str(tmp_path / "images.json")]) == 0
    assert main([*common, "--features", str(features), "--json", str(tmp_path / "cache.json")]) == 0
    from_images = json.loads((tmp_path / "images.json").read_text())
    assert from_images["images"] == 4 and from_images["skipped_images"] == 0
    assert json.loads((tmp_path / "cache.json").read_text()) == from_images


def test_eval_names_images_missing_from_the_cache_and_refuses_another_encoder(data, tmp_path, capsys):
    torch.manual_seed(0)
    save_stage1(Stage1Model(preset("tiny")), load_tokenizer(data), tmp_path / "export")
    features = cache(data, tmp_path / "c", files=("val.json",), config=tmp_path / "export")
    capsys.readouterr()
    common = ["eval", "retrieval", "--model", str(tmp_path / "export"), "--no-progress", "--features", str(features)]
    assert main([*common, "--data", str(data / "test.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "4 image(s) of" in error and images_of(data, "test.json")[0] in error
    other = cache(data, tmp_path / "other", "--seed", "3", files=("test.json",))  # the preset with another seed
    capsys.readouterr()
    assert main([*common[:-1], str(other), "--data", str(data / "test.json")]) == 2
    assert "weights_sha256" in capsys.readouterr().err


# --- interrupted caching --------------------------------------------------------------------------------
def test_an_interrupted_cache_is_refused_then_resumed_to_the_same_bytes(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(caching, "PART_BYTES", 3 * 17 * 32 * 2 * 10)  # 10 images per part: 4 parts
    reference = cache(data, tmp_path / "reference", "--views", "2")
    write_part, calls = caching._write_part, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the third part
        return write_part(*args, **kwargs)

    monkeypatch.setattr(caching, "_write_part", interrupted)
    out = tmp_path / "c"
    argv = ["cache-features", "--config", "tiny", "--data", str(data / "train.json"), "--images", str(data), "--out", str(out), "--views", "2"]
    assert main(argv) == 130
    assert not (out / MANIFEST).exists() and sorted(p.name for p in out.glob("features-*.npy")) == ["features-00000.npy", "features-00001.npy"]
    assert not list(out.glob(".*partial"))  # the interrupted part's partial file is gone
    (out / ".features-00003.npy.partial").write_bytes(b"left by a kill -9")  # what a SIGKILL would leave
    capsys.readouterr()
    with pytest.raises(ValueError, match="incomplete feature cache .* rerun the command that made it to resume: qformer cache-features"):
        FeatureCache(out)
    # Other settings are refused without --overwrite; the same command resumes.
    assert main([*argv[:-1], "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.setattr(caching, "_write_part", write_part)
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().err and (out / MANIFEST).is_file()
    for name in ("features-00000.npy", "features-00001.npy", "features-00002.npy", "features-00003.npy"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert main([*argv[:-1], "3", "--overwrite"]) == 0
    assert FeatureCache(out).train_views == 3


# --- broken images --------------------------------------------------------------------------------------
def test_broken_images_are_named_once_when_caching_and_their_samples_skipped_later(data, tmp_path, capsys):
    broken = write_broken_images(tmp_path / "images" / "broken")
    root = tmp_path / "images"
    good = images_of(data, "val.json")
    for path in good:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes((data / path).read_bytes())
    names = [f"broken/{p.name}" for p in broken.values()] + ["broken/missing.jpg"]
    entries = [{"image": p, "caption": [f"caption {i}", f"other caption {i}"], "image_id": i} for i, p in enumerate(good + names)]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    out = tmp_path / "c"
    assert main(["cache-features", "--config", "tiny", "--data", str(tmp_path / "ann.json"), "--images", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for name in names:
        assert captured.err.count(name) == 1, name
    assert "5 unreadable image(s) recorded as skipped" in captured.out
    features = FeatureCache(out)
    assert sorted(features.skipped) == sorted(names)
    # Training: their samples are skipped records, counted by the batch (as unreadable images are).
    samples = [(e["image"], c, i) for i, e in enumerate(entries) for c in e["caption"]]
    dataset = CachedCaptionDataset(samples, features, train=True)
    batch = Collate(BertText(load_tokenizer(data), 16))([dataset[i] for i in range(len(dataset))])
    assert len(batch["skipped"]) == 10 and len(batch["pixel_values"]) == len(dataset)
    assert "unreadable when cached" in batch["skipped"][0]
    with pytest.raises(OSError, match="unreadable when cached"):
        CachedCaptionDataset(samples, features, train=True, strict=True)[len(good) * 2]
    # Evaluation: dropped with their captions and counted, as with images.
    torch.manual_seed(0)
    save_stage1(Stage1Model(preset("tiny")), load_tokenizer(data), tmp_path / "export")
    assert main(["eval", "retrieval", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "ann.json"), "--features", str(out),
                 "--no-progress", "--json", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["skipped_images"] == 5 and scores["images"] == 4


def test_the_demos_training_views_are_its_eval_view():
    """Why the demo caches one view: with crop_scale [1, 1] and no flip, a training view is the eval view, pixel for pixel."""
    from PIL import Image

    from stages.demo.settings import CROP_SCALE, HFLIP

    image = Image.effect_noise((64, 64), 60).convert("RGB")
    views = train_transform(48, HFLIP, tuple(CROP_SCALE))
    assert all(torch.equal(views(image), eval_transform(48)(image)) for _ in range(50))


def test_vision_weights_replace_the_configs_encoder_weights(data, tmp_path):
    from qformer.folders import save_encoder_weights

    torch.manual_seed(7)
    weights = save_encoder_weights(Stage1Model(preset("tiny")).visual_encoder.model.state_dict(), tmp_path, "encoder.safetensors")
    features = FeatureCache(cache(data, tmp_path / "c", "--vision-weights", str(weights), "--seed", "3", files=("val.json",)))
    config = preset("tiny")
    config.vision_config.weights_path = str(weights)
    features.check_encoder(Stage1Model(config).visual_encoder)  # weights from a file: the seed does not matter
    assert "--vision-weights" in features.manifest["command"]
    with pytest.raises(ValueError, match="weights_sha256"):
        features.check_encoder(load_encoder("tiny", seed=3))


# --- one view: only what was done is recorded, and nothing claims augmentations that never happen --------------------
def test_a_one_view_cache_records_no_training_transform_and_refuses_crop_scale(data, tmp_path, capsys):
    folder = cache(data, tmp_path / "c", files=("val.json",))
    assert FeatureCache(folder).manifest["transform"]["train"] is None  # was: hflip true, crop_scale [0.5, 1]
    assert "data.hflip false and data.crop_scale [1.0, 1.0]" in capsys.readouterr().out
    argv = ["cache-features", "--config", "tiny", "--data", str(data / "val.json"), "--images", str(data), "--out", str(tmp_path / "d")]
    assert main([*argv, "--crop-scale", "0.5", "1"]) == 2  # nothing would be cropped
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--crop-scale 0.5 1" in error and "--views V" in error
    assert not (tmp_path / "d").exists()
    assert main([*argv, "--crop-scale", "1", "1", "--no-hflip"]) == 0  # what the eval view is: accepted


def test_a_fit_from_a_one_view_cache_refuses_data_settings_it_cannot_apply(data, tmp_path):
    from stages.data.captions import CaptionDataModule

    folder = cache(data, tmp_path / "c", files=("train.json", "val.json"))

    def setup(**settings):
        module = CaptionDataModule(str(data / "train.json"), val=str(data / "val.json"), features=str(folder), batch_size=4, **settings)
        module.setup("fit")

    with pytest.raises(ValueError, match=r"^data.hflip True: the cache .* holds the eval view only .* set data.hflip: false"):
        setup(image_size=32, crop_scale=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"^data.hflip True and data.crop_scale \[0.5, 1.0\]: .*--views V"):
        setup(image_size=32)
    with pytest.raises(ValueError, match=r"^data.image_size is 224 but the cache .* 32-pixel images: set data.image_size: 32"):
        setup(hflip=False, crop_scale=(1.0, 1.0))  # data.image_size left at its default
    setup(image_size=32, hflip=False, crop_scale=(1.0, 1.0))  # what training from the eval view does


@pytest.mark.parametrize("cached", [False, True])
def test_validation_can_take_the_first_captions_of_each_image(data, tmp_path, cached):
    """data.val_captions_per_image: the first N captions of every image, read from images or from a feature cache."""
    from stages.data.captions import CaptionDataModule

    entries = json.loads((data / "val.json").read_text())
    assert all(len(e["caption"]) >= 3 for e in entries)  # caption lists: something to leave out
    source = dict(features=str(cache(data, tmp_path / "c", files=("train.json", "val.json")))) if cached else dict(image_root=str(data))

    def val_texts(**settings) -> list[tuple[str, str]]:
        module = CaptionDataModule(str(data / "train.json"), val=str(data / "val.json"), batch_size=4, image_size=32, hflip=False,
                                   crop_scale=(1.0, 1.0), **source, **settings)
        module.setup("fit")
        return [(image, text) for image, text, _ in module.val_set.samples]

    everything = val_texts()
    assert len(everything) == sum(len(e["caption"]) for e in entries)
    assert val_texts(val_captions_per_image=1) == [(e["image"], e["caption"][0]) for e in entries]
    assert val_texts(val_captions_per_image=2) == [(e["image"], c) for e in entries for c in e["caption"][:2]]
    with pytest.raises(ValueError, match=r"^data.val_captions_per_image must be at least 1, got 0"):
        val_texts(val_captions_per_image=0)
    shards = CaptionDataModule(str(data / "train.json"), val=str(data / "val-{00000..00001}.tar"), image_root=str(data),
                               val_captions_per_image=1)
    with pytest.raises(ValueError, match=r"^data.val_captions_per_image: shards hold one caption per sample"):
        shards.setup("fit")


# --- damaged parts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "foreign", "missing"])
def test_a_damaged_part_is_named_and_the_command_that_made_the_cache_redoes_it(data, tmp_path, capsys, damage):
    argv = ["cache-features", "--config", "tiny", "--data", str(data / "val.json"), "--images", str(data), "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    part = tmp_path / "c" / "features-00000.npy"
    whole = part.read_bytes()
    if damage == "truncated":
        part.write_bytes(whole[: len(whole) // 2])
    elif damage == "header":
        part.write_bytes(whole[:60])
    elif damage == "empty":
        part.write_bytes(b"")
    elif damage == "foreign":
        np.save(part, np.zeros((2, 1, 17, 31), np.float16))  # a whole .npy file, not this cache's array
    else:
        part.unlink()
    with pytest.raises(ValueError) as refused:
        FeatureCache(tmp_path / "c")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(part) in message and "pickle" not in message
    assert "rerun the command that made the cache, which redoes damaged parts: qformer cache-features" in message
    capsys.readouterr()
    assert main(argv) == 0  # was: "already holds this feature cache; nothing to do"
    assert "1 damaged part(s)" in capsys.readouterr().err and part.read_bytes() == whole
    FeatureCache(tmp_path / "c")
