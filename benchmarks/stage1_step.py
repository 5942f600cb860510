"""Stage-1 training throughput (samples/s) and peak memory of one full step (3 losses + AdamW).

    python benchmarks/stage1_step.py                         # CPU: tiny, and a bert-base Q-Former on a ViT-Ti
    python benchmarks/stage1_step.py --device cuda --configs vitg --batch 64   # GPU, bf16 autocast

Reference: the paper's ViT-g stage 1 ran at about 50 samples/s per A100 (16 GPUs, batch 1680).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qformer.config import QFormerConfig, VisionConfig, preset
from qformer.losses import stage1_losses
from qformer.stage1 import Stage1Model
from stages.train.optim import configure_adamw

from common import describe_machine, print_table, time_ms  # noqa: E402


def config_named(name: str):
    if name == "base_vit_ti":  # bert-base Q-Former, 32 queries, on a real-size ViT-Ti/16 at 224 px
        config = preset("vitg")
        config.vision_config = VisionConfig(model_name="vit_tiny_patch16_224", precision="fp32")
        config.qformer_config = QFormerConfig(encoder_hidden_size=192)
        return config
    return preset(name)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="tiny,base_vit_ti")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    rows = []
    for name in args.configs.split(","):
        torch.manual_seed(0)
        config = config_named(name)
        model = Stage1Model(config).to(device).train()
        optimizer = configure_adamw(model, 1e-4, 1e-5, 0.05, 10, 1000)["optimizer"]
        B, size = args.batch, config.vision_config.image_size
        pixels = torch.randn(B, 3, size, size, device=device)
        ids = torch.randint(1000, config.qformer_config.vocab_size - 1, (B, args.text_length), device=device)
        mask = torch.ones_like(ids)
        mask[B // 2 :, args.text_length // 2 :] = 0

        def step():
            with autocast:
                losses = stage1_losses(model, pixels, ids, mask, None, config.qformer_config.vocab_size - 1)
            losses.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(step, device, args.warmup, args.repeats)
        rows.append([name, B, ms, f"{B / ms * 1000:.1f}", f"{peak_memory_mb(device):.0f}", f"{model.trainable_parameters():,}"])
    print(f"stage-1 step (ITC + ITM + ITG + AdamW), text {args.text_length}, {describe_machine(device)}")
    print_table(["config", "batch", "ms/step", "samples/s", "peak MiB", "trainable"], rows)


if __name__ == "__main__":
    main()
