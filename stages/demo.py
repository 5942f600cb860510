"""`qformer demo`: stage 1, stage 2 and evaluation end to end on built-in synthetic data, on a CPU.

Every step goes through the same commands a user runs (`make-data`, `stage1 fit`, `export`, `stage2 fit`,
`export`, `eval retrieval`, `eval caption`, `caption`, `ask`), with config files written to `OUT/configs`.
The only step a real run does not have is the first: with no pretrained LLM available offline, a small
language model (OPT or T5 architecture) is trained on the training captions' text, then frozen, as the
stand-in for a pretrained LLM. The frozen image encoder is a randomly initialised timm ViT (no pretrained
vision weights can be had offline): the Q-Former learns to read what its random features preserve.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from stages.cli import main as qformer
from stages.optim import warmup_cosine
from stages.synthetic import questions_for

ENCODER = ("timm vit_tiny_patch16_224 architecture (64 wide, 3 blocks of which 2 are used, 8 px patches, 48 px input), "
           "randomly initialised with a fixed 2-D sin-cos position embedding, and frozen")
CAPTION_PROMPT = "a photo of"


@dataclass
class DemoSettings:
    out: str = "demo_out"
    lm: str = "opt"  # opt (decoder-only) | t5 (encoder-decoder)
    seed: int = 0
    num_images: int = 10000  # val_images + test_images, the rest train
    val_images: int = 250
    test_images: int = 250
    image_size: int = 48
    lm_steps: int = 400
    stage1_steps: int = 900
    stage2_steps: int = 1000
    batch_size: int = 48
    num_beams: int = 3

    @property
    def encoder_decoder(self) -> bool:
        return self.lm == "t5"


ENCODER_KWARGS = {"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4}


def model_config(settings: DemoSettings, vocab_size: int, encoder_weights: Path | None = None) -> dict:
    """The demo's architecture: a small frozen ViT and a small Q-Former (8 queries)."""
    return {
        "vision_config": {
            "model_name": "vit_tiny_patch16_224",
            "image_size": settings.image_size,
            "drop_last_blocks": 1,
            "precision": "fp32",
            "weights_path": None if encoder_weights is None else str(encoder_weights),
            "model_kwargs": ENCODER_KWARGS,
        },
        "qformer_config": {
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "max_position_embeddings": 64,
            "encoder_hidden_size": 64,
            "cross_attention_frequency": 2,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "num_query_tokens": 8,
        "image_text_hidden_size": 64,
        "max_text_length": 20,
    }


def lm_config(settings: DemoSettings, vocab_size: int) -> dict:
    if settings.encoder_decoder:
        return dict(model_type="t5", vocab_size=vocab_size, d_model=128, d_ff=256, d_kv=32, num_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return dict(model_type="opt", vocab_size=vocab_size, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=128, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0)


# --- the stand-in image encoder ------------------------------------------------------------------------
def write_encoder_weights(settings: DemoSettings, out: Path) -> Path:
    """A randomly initialised ViT saved as a local weights file, loaded by the configs like real weights.

    timm initialises position embeddings with std 0.02, a hundredth of what the patch embeddings carry,
    so a random ViT all but hides where a patch is, which a pretrained one does not: the captions need
    left and right. A fixed 2-D sin-cos position embedding (as in MAE) puts it back.
    """
    import timm
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    from qformer.export import save_encoder_weights

    torch.manual_seed(settings.seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=settings.image_size, **ENCODER_KWARGS)
    grid = vit.patch_embed.grid_size
    with torch.no_grad():
        vit.pos_embed[0, vit.num_prefix_tokens:] = build_sincos2d_pos_embed(list(grid), vit.embed_dim)
        vit.pos_embed[0, : vit.num_prefix_tokens] = 0
    return save_encoder_weights(vit.state_dict(), out / "encoder", name="vit_random_sincos.safetensors")


# --- the stand-in LLM -------------------------------------------------------------------------------------
def context_embeddings(model, tokenizer, objects_batch: list[list[dict]], slots: int, noise: float) -> torch.Tensor:
    """The pre-training context, (B, slots, H): slot i holds the i-th object from the left as the sum of its
    size, colour and shape word embeddings; the other slots hold the padding embedding."""
    embed = model.get_input_embeddings()
    pad = embed(torch.tensor(tokenizer.pad_token_id))
    rows = []
    for objects in objects_batch:
        row = [embed(torch.tensor(tokenizer.convert_tokens_to_ids([o["size"], o["color"], o["shape"]]))).sum(0) for o in objects]
        rows.append(torch.stack(row + [pad] * (slots - len(row))))
    context = torch.stack(rows)
    return context + noise * context.detach().std() * torch.randn_like(context)


def pretraining_text(sample: dict, rng: random.Random, encoder_decoder: bool) -> tuple[str, str]:
    """(prefix, text) for one pre-training sample: its caption, or a question about its objects and the answer.

    Decoder-only LMs learn the whole `prefix + text`; encoder-decoder LMs read the prefix and learn the text.
    """
    from qformer.stage2 import VQA_PROMPTS

    if rng.random() < 0.25:
        question, answer = rng.choice(questions_for(sample["objects"]))
        prompt = VQA_PROMPTS["encoder_decoder" if encoder_decoder else "decoder"].format(question)
        return (prompt, answer) if encoder_decoder else (f"{prompt} ", answer)
    if encoder_decoder:
        return CAPTION_PROMPT, sample["caption"]
    return (f"{CAPTION_PROMPT} " if rng.random() < 0.5 else ""), sample["caption"]


def pretrain_language_model(settings: DemoSettings, data: Path, out: Path, slots: int) -> Path:
    """Train the small LM on caption text (what a pretrained LLM would know), save it as a local folder.

    Each text follows a context of `slots` embeddings describing its objects, so that, like a real LLM,
    the stand-in learns to use information given in its context; stage 2 then puts the soft visual prompts
    in that place. A quarter of the texts are questions about the objects with their answers, in the
    paper's VQA prompt format, so that the frozen LM can answer questions about an image zero-shot: stage 2
    itself only ever sees captions.
    """
    import transformers

    from qformer.stage2 import IGNORE, decoder_only_batch, encoder_decoder_batch

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    kind = "t5" if settings.encoder_decoder else "decoder"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / f"lm_tokenizer_{kind}"), local_files_only=True)
    config = transformers.AutoConfig.for_model(**lm_config(settings, len(tokenizer)))
    auto = transformers.AutoModelForSeq2SeqLM if settings.encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    samples = json.loads((data / "train.json").read_text())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, settings.lm_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, settings.lm_steps, 0.03))
    losses = []
    model.train()
    for _ in tqdm(range(settings.lm_steps), desc="LM pre-training on captions and questions", file=sys.stderr):
        batch_samples = rng.sample(samples, 64)
        prefixes, texts = zip(*(pretraining_text(s, rng, settings.encoder_decoder) for s in batch_samples))
        context = context_embeddings(model, tokenizer, [s["objects"] for s in batch_samples], slots, noise=0.3)
        ones = torch.ones(len(texts), slots, dtype=torch.long)
        if settings.encoder_decoder:
            batch = encoder_decoder_batch(tokenizer, list(prefixes), list(texts), 32)
            embeds = torch.cat([context, model.get_input_embeddings()(batch.input_ids)], 1)
            loss = model(inputs_embeds=embeds, attention_mask=torch.cat([ones, batch.attention_mask], 1), labels=batch.labels,
                         decoder_attention_mask=batch.decoder_attention_mask).loss
        else:
            batch = decoder_only_batch(tokenizer, [p + t for p, t in zip(prefixes, texts)], eos_text="</s>", max_length=32)
            embeds = torch.cat([context, model.get_input_embeddings()(batch.input_ids)], 1)
            labels = torch.cat([torch.full((len(texts), slots), IGNORE), batch.labels], 1)
            loss = model(inputs_embeds=embeds, attention_mask=torch.cat([ones, batch.attention_mask], 1), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    folder = out / f"lm_{settings.lm}"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "pretraining_losses.json").write_text(json.dumps(losses))
    return folder


# --- configs --------------------------------------------------------------------------------------------
def write_configs(settings: DemoSettings, out: Path, data: Path, vocab_size: int, lm_folder: Path, encoder_weights: Path) -> dict[str, Path]:
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "model.json").write_text(json.dumps(model_config(settings, vocab_size, encoder_weights), indent=2) + "\n")
    data_section = {
        "train": str(data / "train.json"), "val": str(data / "val.json"), "image_root": str(data),
        "image_size": settings.image_size, "batch_size": settings.batch_size, "num_workers": 0, "max_length": 20,
        "hflip": False, "crop_scale": [1.0, 1.0],  # captions say left/right and small/large
    }
    trainer = {"accelerator": "cpu", "devices": 1, "precision": "32", "log_every_n_steps": 25, "gradient_clip_val": 1.0,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": True}  # same seed, same numbers
    stage1 = {
        "seed_everything": settings.seed,
        "trainer": {**trainer, "max_steps": settings.stage1_steps, "default_root_dir": str(out / "runs" / "stage1"),
                    "check_val_every_n_epoch": None, "val_check_interval": max(1, settings.stage1_steps // 2)},
        "model": {"config": str(configs / "model.json"), "tokenizer": str(data), "lr": 3e-3, "min_lr": 1e-4,
                  "weight_decay": 0.05, "warmup_steps": 100, "val_retrieval": "itc"},
        "data": data_section,
    }
    stage2 = {
        "seed_everything": settings.seed,
        "trainer": {**trainer, "max_steps": settings.stage2_steps, "default_root_dir": str(out / "runs" / "stage2"),
                    "check_val_every_n_epoch": None, "val_check_interval": max(1, settings.stage2_steps // 2)},
        "model": {"stage1": str(out / "exports" / "stage1"), "lm_path": str(lm_folder), "lm_precision": "fp32",
                  "prompt": CAPTION_PROMPT if settings.encoder_decoder else f"{CAPTION_PROMPT} ", "eos_text": "</s>",
                  "max_text_length": 32, "lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "warmup_steps": 100,
                  "val_num_beams": 1, "val_max_new_tokens": 16},
        "data": data_section,
    }
    paths = {"stage1": configs / "stage1.yaml", "stage2": configs / "stage2.yaml"}
    paths["stage1"].write_text(yaml.safe_dump(stage1, sort_keys=False))
    paths["stage2"].write_text(yaml.safe_dump(stage2, sort_keys=False))
    return paths


# --- scoring and pictures ---------------------------------------------------------------------------------
def attribute_accuracy(predictions: dict[str, str], entries: list[dict]) -> float:
    """Fraction of images whose caption names every object's colour and shape (as "colour shape")."""
    hits = 0
    for entry in entries:
        caption = predictions.get(str(entry["image_id"]), "")
        hits += all(f"{o['color']} {o['shape']}" in caption for o in entry["objects"])
    return hits / len(entries)


def _read_metrics(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def plot_losses(out: Path, lm_folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lm_losses = json.loads((lm_folder / "pretraining_losses.json").read_text())
    axes[0].plot(lm_losses)
    axes[0].set(title="stand-in LLM pre-training (text after an object context)", xlabel="step", ylabel="loss")
    rows = _read_metrics(out / "runs" / "stage1")
    for name in ("itc", "itm", "itg"):
        points = [(int(r["step"]), float(r[f"train/loss_{name}"])) for r in rows if r.get(f"train/loss_{name}")]
        axes[1].plot(*zip(*points), label=name.upper())
    axes[1].set(title="stage 1", xlabel="step", ylabel="loss")
    axes[1].legend()
    rows = _read_metrics(out / "runs" / "stage2")
    points = [(int(r["step"]), float(r["train/loss_lm"])) for r in rows if r.get("train/loss_lm")]
    axes[2].plot(*zip(*points))
    axes[2].set(title="stage 2 (frozen LM)", xlabel="step", ylabel="LM loss")
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_samples(out: Path, data: Path, entries: list[dict], predictions: dict[str, str], count: int = 12) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = entries[:count]
    fig, axes = plt.subplots(3, 4, figsize=(14, 11))
    for ax, entry in zip(axes.flat, shown):
        ax.imshow(Image.open(data / entry["image"]))
        ax.set_axis_off()
        ok = all(f"{o['color']} {o['shape']}" in predictions.get(str(entry["image_id"]), "") for o in entry["objects"])
        ax.set_title(_wrap(predictions.get(str(entry["image_id"]), "")), fontsize=9, color="darkgreen" if ok else "darkred")
    fig.suptitle("held-out test images and their generated captions (green: every colour and shape right)")
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 32) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


# --- the pipeline -----------------------------------------------------------------------------------------
def _run(argv: list[str], capture: bool = False) -> str:
    """One `qformer` command, exactly as on the command line; fails loudly."""
    print(f"\n$ qformer {' '.join(argv)}", file=sys.stderr)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
        code = qformer(argv)
    if code != 0:
        raise RuntimeError(f"qformer {argv[0]} failed with exit status {code}")
    return buffer.getvalue()


def _checkpoint(run_dir: Path) -> Path:
    """The final weights (the short demo runs validate rarely, so "best" would often be an early one)."""
    return sorted(run_dir.rglob("last.ckpt"))[-1]


def run_demo(settings: DemoSettings) -> dict:
    from qformer.bert import load_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    start = clock
    _run(["make-data", str(data), "--num-images", str(settings.num_images), "--seed", str(settings.seed), "--image-size", "64",
          "--val-images", str(settings.val_images), "--test-images", str(settings.test_images)])
    phase("data")

    num_queries = model_config(settings, 0)["num_query_tokens"]
    lm_folder = pretrain_language_model(settings, data, out, slots=num_queries)
    phase("lm_pretraining")

    vocab_size = len(load_tokenizer(data))
    configs = write_configs(settings, out, data, vocab_size, lm_folder, write_encoder_weights(settings, out))
    _run(["stage1", "fit", "--config", str(configs["stage1"])])
    # --overwrite: the demo owns its --out folder, so a second run replaces its own exports
    _run(["export", str(_checkpoint(out / "runs" / "stage1")), "--out", str(out / "exports" / "stage1"), "--overwrite"])
    phase("stage1")

    _run(["stage2", "fit", "--config", str(configs["stage2"])])
    _run(["export", str(_checkpoint(out / "runs" / "stage2")), "--out", str(out / "exports" / "stage2"), "--overwrite"])
    phase("stage2")

    test = str(data / "test.json")
    _run(["eval", "retrieval", "--model", str(out / "exports" / "stage1"), "--data", test, "--images", str(data),
          "--k-test", "16", "--json", str(out / "retrieval.json")], capture=True)
    retrieval = json.loads((out / "retrieval.json").read_text())
    phase("eval_retrieval")

    _run(["eval", "caption", "--model", str(out / "exports" / "stage2"), "--data", test, "--images", str(data),
          "--num-beams", str(settings.num_beams), "--max-new-tokens", "20", "--min-new-tokens", "3", "--prompt", CAPTION_PROMPT,
          "--json", str(out / "caption.json"), "--predictions", str(out / "predictions.json")], capture=True)
    caption = json.loads((out / "caption.json").read_text())
    predictions = {str(p["image_id"]): p["caption"] for p in json.loads((out / "predictions.json").read_text())}
    entries = json.loads((data / "test.json").read_text())
    caption["attribute_accuracy"] = 100 * attribute_accuracy(predictions, entries)
    phase("eval_caption")

    _run(["eval", "vqa", "--model", str(out / "exports" / "stage2"), "--data", str(data / "test_vqa.json"), "--images", str(data),
          "--num-beams", str(settings.num_beams), "--json", str(out / "vqa.json"), "--predictions", str(out / "vqa_predictions.json")], capture=True)
    vqa = json.loads((out / "vqa.json").read_text())
    phase("eval_vqa")

    examples = []
    questions = json.loads((data / "test_vqa.json").read_text())[:4]
    sample_images = [str(data / e["image"]) for e in entries[:4]]
    captions = json.loads(_run(["caption", "--model", str(out / "exports" / "stage2"), *sample_images, "--json",
                                "--num-beams", str(settings.num_beams), "--min-new-tokens", "3", "--prompt", CAPTION_PROMPT], capture=True))
    for item, entry, question in zip(captions, entries[:4], questions):
        answer = _run(["ask", item["image"], question["question"], "--model", str(out / "exports" / "stage2")], capture=True).strip()
        examples.append({"image": item["image"], "caption": item["caption"], "reference": entry["caption"][0],
                         "question": question["question"], "answer": answer, "expected": question["answer"][0]})
    phase("examples")

    plot_samples(out, data, entries, predictions)
    plot_losses(out, lm_folder)
    phase("figures")
    seconds["total"] = round(time.perf_counter() - start, 1)

    results = {
        "retrieval": retrieval,
        "caption": caption,
        "vqa": vqa,
        "seconds": seconds,
        "encoder": ENCODER,
        "lm": f"{'T5' if settings.encoder_decoder else 'OPT'} architecture ({lm_config(settings, vocab_size)}), pre-trained here for "
              f"{settings.lm_steps} steps on the training captions' text (and questions with answers) after a context of one embedding "
              "per object, then frozen",
        "data": {split: len(json.loads((data / f'{split}.json').read_text())) for split in ("val", "test")} | {"train_captions": len(json.loads((data / 'train.json').read_text()))},
        "chance_r1": 100 / len(entries),
        "examples": examples,
        "settings": asdict(settings),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, out)
    return results


def print_summary(results: dict, out: Path) -> None:
    r, c = results["retrieval"], results["caption"]
    print()
    print(f"qformer demo — held-out test split: {r['images']} images, {r['texts']} captions (chance R@1 {results['chance_r1']:.1f}%)")
    print(f"  image encoder: {results['encoder']}")
    print(f"  language model: {results['lm'].split(' (')[0]}, pre-trained here on caption text, then frozen")
    rows = [
        ("text retrieval R@1 / R@5 / R@10", f"{r['txt_r1']:.1f} / {r['txt_r5']:.1f} / {r['txt_r10']:.1f}"),
        ("image retrieval R@1 / R@5 / R@10", f"{r['img_r1']:.1f} / {r['img_r5']:.1f} / {r['img_r10']:.1f}"),
        ("caption BLEU-4 / CIDEr", f"{c['bleu4']:.1f} / {c['cider']:.1f}"),
        ("caption attribute accuracy", f"{c['attribute_accuracy']:.1f} %"),
        ("zero-shot VQA accuracy", f"{results['vqa']['accuracy']:.1f} % ({results['vqa']['questions']} questions)"),
        ("time (s)", ", ".join(f"{k} {v}" for k, v in results["seconds"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  examples:")
    for e in results["examples"]:
        print(f"    {Path(e['image']).name}: caption {e['caption']!r} (reference {e['reference']!r}); "
              f"{e['question']!r} -> {e['answer']!r} (expected {e['expected']!r})")
    print(f"  everything is in {out}/ (results.json, samples.png, losses.png, configs/, runs/, exports/)")
