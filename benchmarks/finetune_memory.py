"""Peak GPU memory of the paper's fine-tuning recipes, the image encoder trained: measured, one process per row.

    python benchmarks/finetune_memory.py                     # CUDA: the rows below
    python benchmarks/finetune_memory.py --rows caption_ckpt --batch-size 4

Rows (random weights built from the configs, nothing downloaded; ViT-g/14 = EVA-CLIP giant, its last block dropped):
- caption (LAVIS caption_coco_opt2.7b_ft): ViT-g at 364 px trained in fp32 under a bf16 autocast + the Q-Former +
  the projection, OPT-2.7B frozen in fp16; prompt "a photo of" and a caption, 40 LM tokens;
- retrieval (LAVIS retrieval_coco_ft): stage 1 (ITC + ITM + ITG) with ViT-g at 364 px trained, 32 text tokens;
each with and without gradient checkpointing of the encoder's blocks (`_ckpt`). AdamW (fused) over the trained
parameters; the peak is torch.cuda.max_memory_allocated over two steps (weights, gradients, AdamW state and
activations), the step time the second step's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

OPT_2_7B = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560)
ROWS = ("caption", "caption_ckpt", "retrieval", "retrieval_ckpt")
GIB = 2**30


def build(row: str, image_size: int):
    from qformer.config import LanguageModelConfig, preset
    from qformer.stage1 import Stage1Model
    from qformer.stage2 import Stage2Model

    config = preset("vitg")
    config.vision_config.weights_path = None
    config.vision_config.image_size = image_size
    with torch.device("cuda"):
        if row.startswith("caption"):
            config.language_model = LanguageModelConfig(config=OPT_2_7B, precision="fp16")
            model = Stage2Model(config, train_vision=True)
        else:
            model = Stage1Model(config, train_vision=True)
    model.visual_encoder.use_gradient_checkpointing(row.endswith("_ckpt"))
    return model.train()


def one_step(model, row: str, batch: int, image_size: int) -> None:
    from qformer.losses import stage1_losses

    pixels = torch.randn(batch, 3, image_size, image_size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if row.startswith("caption"):
            ids = torch.randint(4, 50000, (batch, 40), device="cuda")
            labels = ids.clone()
            labels[:, :4] = -100  # BOS + "a photo of"
            loss = model(pixels, ids, torch.ones_like(ids), labels)
        else:
            ids = torch.randint(1000, 30000, (batch, 32), device="cuda")
            ids[:, 0] = 101
            losses = stage1_losses(model, pixels, ids, torch.ones_like(ids), None, dec_token_id=30522)
            loss = losses.itc + losses.itm + losses.itg
    loss.backward()


def measure(row: str, batch: int, image_size: int) -> dict:
    torch.manual_seed(0)
    model = build(row, image_size)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.05, fused=True)
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        one_step(model, row, batch, image_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"row": row, "image_size": image_size, "batch": batch, "trained_params": sum(p.numel() for p in trained),
            "all_params": sum(p.numel() for p in model.parameters()), "weights_gib": weights / GIB,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--batch-size", type=int, default=16)  # LAVIS's per-GPU batch of both recipes
    parser.add_argument("--image-size", type=int, default=364)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process measuring one row
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.batch_size, args.image_size)), flush=True)
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| row | px | batch | trained params | all params | after build GiB | peak GiB | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", row, "--batch-size", str(args.batch_size),
                               "--image-size", str(args.image_size)], capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {row} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]} |")
            continue
        r = json.loads(line[7:])
        print(f"| {r['row']} | {r['image_size']} | {r['batch']} | {r['trained_params']:,} | {r['all_params']:,} | "
              f"{r['weights_gib']:.1f} | {r['peak_gib']:.1f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
