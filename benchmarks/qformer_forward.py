"""Forward + backward of our Q-Former against transformers' Blip2QFormerModel, same weights, same run.

    python benchmarks/qformer_forward.py                      # CPU, tiny + base configs
    python benchmarks/qformer_forward.py --device cuda --dtype bf16

Two passes are timed per config: the ITC image pass (32 queries cross-attending to 257 image tokens) and
the ITM joint pass (32 queries + 32 text tokens, bidirectional, cross-attention for the queries).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qformer.config import QFormerConfig
from qformer.interop.names import stage1_key_to_hf
from qformer.masks import padding_mask, with_queries
from qformer.qformer import QFormer

from common import describe_machine, print_table, time_ms  # noqa: E402

CONFIGS = {
    "tiny": QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, encoder_hidden_size=64),
    "base": QFormerConfig(encoder_hidden_size=1408),  # the paper's bert-base Q-Former on ViT-g features
}


def build_pair(config: QFormerConfig, num_queries: int, device: torch.device):
    ours = QFormer(config, num_queries)
    hf_config = transformers.Blip2QFormerConfig(**dataclasses.asdict(config), use_qformer_text_input=True)
    hf_config._attn_implementation = "sdpa"
    embeddings = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(hf_config)
    theirs = transformers.Blip2QFormerModel(hf_config)
    hf_modules = {"embeddings.": embeddings, "qformer.": theirs}
    query_tokens = torch.nn.Parameter(ours.query_tokens.detach().clone())
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            hf_key = stage1_key_to_hf("qformer." + key)
            if hf_key == "query_tokens":
                continue
            prefix = next(p for p in hf_modules if hf_key.startswith(p))
            hf_modules[prefix].state_dict()[hf_key[len(prefix):]].copy_(value)
    return ours.to(device).train(), embeddings.to(device).train(), theirs.to(device).train(), query_tokens.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights")
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=257)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    rows = []
    for name in args.configs.split(","):
        config = CONFIGS[name]
        torch.manual_seed(0)
        ours, embeddings, theirs, query_tokens = build_pair(config, args.num_queries, device)
        B, L, Q = args.batch, args.text_length, args.num_queries
        image = torch.randn(B, args.image_tokens, config.encoder_hidden_size, device=device)
        input_ids = torch.randint(1000, config.vocab_size, (B, L), device=device)
        text_mask = torch.ones(B, L, dtype=torch.long, device=device)
        text_mask[B // 2 :, L // 2 :] = 0
        joint_mask = with_queries(Q, text_mask).long()

        def ours_image():
            with autocast:
                out = ours(image_embeds=image).last_hidden_state
            out.float().sum().backward()

        def theirs_image():
            with autocast:
                out = theirs(query_embeds=query_tokens.expand(B, -1, -1), encoder_hidden_states=image).last_hidden_state
            out.float().sum().backward()

        def ours_joint():
            with autocast:
                out = ours(input_ids, padding_mask(joint_mask), image_embeds=image).last_hidden_state
            out.float().sum().backward()

        def theirs_joint():
            with autocast:
                embeds = embeddings(input_ids=input_ids, query_embeds=query_tokens.expand(B, -1, -1))
                out = theirs(query_embeds=embeds, query_length=Q, attention_mask=joint_mask, encoder_hidden_states=image).last_hidden_state
            out.float().sum().backward()

        for mode, ours_step, theirs_step in (("image (ITC)", ours_image, theirs_image), ("joint (ITM)", ours_joint, theirs_joint)):
            ours_ms = time_ms(ours_step, device, args.warmup, args.repeats)
            theirs_ms = time_ms(theirs_step, device, args.warmup, args.repeats)
            rows.append([name, mode, ours_ms, theirs_ms, f"{ours_ms / theirs_ms:.2f}"])

    print(f"Q-Former forward+backward, batch {args.batch}, {args.image_tokens} image tokens, text {args.text_length}, "
          f"{args.dtype}, {describe_machine(device)}")
    print_table(["config", "pass", "ours ms", "transformers ms", "ours/theirs"], rows)


if __name__ == "__main__":
    main()
