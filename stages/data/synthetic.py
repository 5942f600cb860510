"""A seeded generator of small synthetic scenes with captions, in the format the data module reads.

Each image shows one or two objects (colour, shape, size, left/right). Every caption names every
object's size, colour and shape in order, and within the val and test splits no two images have the same
content, so each caption identifies exactly one image and retrieval recall is meaningful.
The folder gets `images/*.png`, `train.json` (one caption per entry, LAVIS style), `val.json` and
`test.json` (a list of captions per image, with the objects), `val_vqa.json` and `test_vqa.json` (one
question per image, VQA format: "what color is the circle?", "what shape is the red object?"), a BERT
`vocab.txt` covering the captions, and word-level tokenizers for small decoder-only and T5-style language
models (`lm_tokenizer_*`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _draw(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _scene(rng: random.Random) -> list[dict]:
    count = rng.choice((1, 2))
    objects = [{"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES)} for _ in range(count)]
    if count == 2 and objects[0]["color"] == objects[1]["color"] and objects[0]["shape"] == objects[1]["shape"]:
        objects[1]["color"] = next(c for c in COLORS if c != objects[0]["color"])
    return objects  # left to right


def _render(objects: list[dict], rng: random.Random, size: int) -> Image.Image:
    shade = rng.randint(200, 250)
    image = Image.new("RGB", (size, size), (shade, shade, shade - rng.randint(0, 30)))
    draw = ImageDraw.Draw(image)
    for _ in range(size // 4):  # light texture so the background is never a constant
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=(shade - 25, shade - 25, shade - 25))
    slots = [size / 2] if len(objects) == 1 else [size * 0.27, size * 0.73]
    for obj, cx in zip(objects, slots):
        r = size * (0.12 if obj["size"] == "small" else 0.2)
        cy = size / 2 + rng.uniform(-size * 0.15, size * 0.15)
        _draw(draw, obj["shape"], COLORS[obj["color"]], cx + rng.uniform(-size * 0.05, size * 0.05), cy, r)
    return image


def captions_for(objects: list[dict]) -> list[str]:
    """Five differently worded captions, each naming every object's size, colour and shape (and their order)."""
    def name(o):
        return f"{o['size']} {o['color']} {o['shape']}"

    if len(objects) == 1:
        o = objects[0]
        return [
            f"a {name(o)}",
            f"there is a {name(o)} in the image",
            f"a picture of one {name(o)}",
            f"a {name(o)} on a plain background",
            f"one {o['size']} {o['shape']} that is {o['color']}",
        ]
    a, b = objects
    return [
        f"a {name(a)} to the left of a {name(b)}",
        f"a {name(b)} to the right of a {name(a)}",
        f"a {name(a)} and a {name(b)} on its right",
        f"two shapes a {name(a)} on the left and a {name(b)} on the right",
        f"a picture of a {name(a)} next to a {name(b)} on the right",
    ]


def questions_for(objects: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs with one right answer: the colour of a shape seen once, the shape of a colour seen once."""
    pairs = []
    for o in objects:
        if sum(other["shape"] == o["shape"] for other in objects) == 1:
            pairs.append((f"what color is the {o['shape']}?", o["color"]))
        if sum(other["color"] == o["color"] for other in objects) == 1:
            pairs.append((f"what shape is the {o['color']} object?", o["shape"]))
    return pairs


def vqa_entries(entries: list[dict]) -> list[dict]:
    """One question per image in the VQA evaluation format; all ten "annotators" give the same answer."""
    questions = []
    for entry in entries:
        pairs = questions_for(entry["objects"])
        question, answer = pairs[entry["image_id"] % len(pairs)]
        questions.append({"question_id": entry["image_id"], "image": entry["image"], "question": question, "answer": [answer] * 10})
    return questions


def distinct_contents() -> int:
    """How many different scenes `_scene` can draw: one object, or two that differ in colour or shape."""
    kinds = len(COLORS) * len(SHAPES) * len(SIZES)
    return kinds + kinds * kinds - len(COLORS) * len(SHAPES) * len(SIZES) ** 2


def content_key(objects: list[dict]) -> tuple:
    return tuple((o["size"], o["color"], o["shape"]) for o in objects)


def write_vocab(folder: Path, captions: list[str], extra_words: list[str] = ()) -> None:
    words = sorted({w for c in captions for w in c.split()} | set(extra_words))
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n")


def make_dataset(folder: str | Path, num_images: int = 1000, seed: int = 0, image_size: int = 64,
                 val_images: int | None = None, test_images: int | None = None, instruct: bool = False) -> dict:
    """Write the dataset; returns {"train": n, "val": n, "test": n} image counts.

    `val_images` and `test_images` default to 10% of `num_images` each; the rest is the training split. With
    `instruct`, also the instruction tasks and their templates (`stages.data.synthetic_tasks`), whose words the
    vocabularies then hold too.
    """
    folder = Path(folder)
    n_val = num_images // 10 if val_images is None else val_images
    n_test = num_images // 10 if test_images is None else test_images
    n_train = num_images - n_val - n_test
    if n_train < 1:
        raise ValueError(f"--num-images {num_images} leaves no training images after {n_val} val and {n_test} test images")
    if max(n_val, n_test) > distinct_contents():
        raise ValueError(f"a val/test split of {max(n_val, n_test)} images cannot have distinct content in every image (at most {distinct_contents()})")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    seen = {"val": set(), "test": set()}  # in the evaluation splits every image's content is unique
    all_captions = []
    for i in range(num_images):
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        objects = _scene(rng)
        while split in seen and content_key(objects) in seen[split]:
            objects = _scene(rng)
        if split in seen:
            seen[split].add(content_key(objects))
        path = f"images/{i:06d}.png"
        _render(objects, rng, image_size).save(folder / path)
        captions = captions_for(objects)
        all_captions += captions
        splits[split].append({"image": path, "caption": captions, "image_id": i, "objects": objects})
    train = [{"image": e["image"], "caption": c, "image_id": e["image_id"], "objects": e["objects"]} for e in splits["train"] for c in e["caption"]]
    (folder / "train.json").write_text(json.dumps(train, indent=1))
    for split in ("val", "test"):
        (folder / f"{split}.json").write_text(json.dumps(splits[split], indent=1))
        (folder / f"{split}_vqa.json").write_text(json.dumps(vqa_entries(splits[split]), indent=1))
    extra_words = []
    if instruct:
        from stages.data.synthetic_tasks import task_words, words_of, write_instruction_tasks

        write_instruction_tasks(folder, splits)
        extra_words = words_of(task_words(COLORS, SHAPES))
    write_vocab(folder, all_captions, extra_words)
    write_lm_tokenizer(folder / "lm_tokenizer_decoder", all_captions, encoder_decoder=False, extra_words=extra_words)
    write_lm_tokenizer(folder / "lm_tokenizer_t5", all_captions, encoder_decoder=True, extra_words=extra_words)
    return {split: len(entries) for split, entries in splits.items()}


def write_lm_tokenizer(folder: str | Path, captions: list[str], encoder_decoder: bool, extra_words: list[str] = ()) -> Path:
    """A word-level tokenizer for the demo's small language models, saved as a transformers folder.

    Decoder-only (OPT-like): ids <pad>=1, </s>=2 doubles as BOS (prepended); encoder-decoder (T5-like):
    <pad>=0 (also the decoder start), </s>=1 appended to every sequence.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["<pad>", "</s>", "<unk>"] if encoder_decoder else ["<unk>", "<pad>", "</s>"]
    words = sorted({w for c in captions for w in c.split()} | {"question", "answer", "short", ":", "?", "what", "is", "the", "color", "of", "shape", "object", "a", "photo"} | set(extra_words))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    eos = vocab["</s>"]
    template = "$A </s>" if encoder_decoder else "</s> $A"
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", eos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                      bos_token=None if encoder_decoder else "</s>")
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder


def make_data(folder: str, *, num_images: int = 1000, seed: int = 0, image_size: int = 64, val_images: int | None = None,
              test_images: int | None = None, instruct: bool = False) -> int:
    """Write the built-in synthetic dataset: PNGs, caption annotations, VQA questions, a BERT vocab.txt, LM tokenizers.

    Args:
        folder: where to write it.
        num_images: images in all (validation + test + training).
        seed: the random seed (the same seed writes the same files).
        image_size: pixels per side.
        val_images: validation images (default: 10% of --num-images).
        test_images: test images (default: 10% of --num-images).
        instruct: also write the instruction tasks (colour, shape, count, position questions per split:
            `{split}_{task}.json`) and their training and held-out templates (`templates.yaml`, `templates_heldout.yaml`).
    """
    counts = make_dataset(folder, num_images, seed, image_size, val_images, test_images, instruct)
    print(f"wrote {sum(counts.values())} images to {folder}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
