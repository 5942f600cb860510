"""Stage-2 training step and caption generation, ours vs transformers' Blip2ForConditionalGeneration, same weights.

    python benchmarks/stage2.py                                   # CPU: tiny and small OPT / T5
    python benchmarks/stage2.py --device cuda --sizes opt2.7b      # GPU: OPT-2.7B-sized random weights, bf16

Timed: one training step (forward + backward + AdamW on the trainable bridge) and caption generation
(beam 5, 20 new tokens) at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qformer.config import LanguageModelConfig, QFormerConfig, preset
from qformer.interop.names import to_hf_generation
from qformer.lm_text import IGNORE
from qformer.stage2 import Stage2Model

from common import describe_machine, print_table, time_ms  # noqa: E402

VOCAB = 1000
SIZES = {
    "tiny-opt": dict(model_type="opt", hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "small-opt": dict(model_type="opt", hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8, word_embed_proj_dim=512),
    "small-t5": dict(model_type="t5", d_model=512, d_ff=1024, d_kv=64, num_layers=6, num_heads=8, feed_forward_proj="gated-gelu"),
    "opt2.7b": dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, word_embed_proj_dim=2560),
}
SPECIAL = {"opt": dict(bos_token_id=2, eos_token_id=2, pad_token_id=1, max_position_embeddings=256),
           "t5": dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)}


def build(size: str, device, dtype):
    lm = dict(SIZES[size], vocab_size=VOCAB, **SPECIAL[SIZES[size]["model_type"]])
    config = preset("tiny")
    config.qformer_config = QFormerConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, encoder_hidden_size=32)
    config.num_query_tokens = 32
    config.language_model = LanguageModelConfig(config=lm, precision="fp32")
    ours = Stage2Model(config).eval()
    theirs = to_hf_generation(ours, image_token_index=VOCAB - 1)
    if dtype != torch.float32:  # frozen LM in half precision, trainable parts fp32 (as in training)
        ours.language_model.model.to(dtype)
        theirs.language_model.to(dtype)
    return ours.to(device), theirs.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="tiny-opt,small-opt,small-t5")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        ours, theirs = build(size, device, dtype)
        ours.language_model.precision = args.dtype  # keep the LM in the dtype chosen above
        Q, L = ours.config.num_query_tokens, 24
        encoder_decoder = ours.is_encoder_decoder
        ours_params = [p for p in ours.parameters() if p.requires_grad]
        theirs_params = [p for n, p in theirs.named_parameters() if not n.startswith(("language_model.", "vision_model."))]
        for p in theirs.parameters():
            p.requires_grad_(p in set(theirs_params))
        ours_opt, theirs_opt = torch.optim.AdamW(ours_params), torch.optim.AdamW(theirs_params)

        for batch in (8,):
            pixels = torch.randn(batch, 3, 32, 32, device=device)
            ids = torch.randint(3, VOCAB - 1, (batch, L), device=device)
            mask = torch.ones_like(ids)
            labels = ids.clone()
            hf_ids = torch.cat([torch.full((batch, Q), VOCAB - 1, device=device), ids], 1)
            hf_mask = torch.ones_like(hf_ids)

            def ours_step():
                ours(pixels, ids, mask, labels).backward()
                ours_opt.step()
                ours_opt.zero_grad()

            def theirs_step():
                if encoder_decoder:
                    loss = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=labels).loss
                else:  # transformers' own decoder-only loss fails on a sliced view; same computation here
                    logits = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask).logits[:, -L:]
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
                loss.backward()
                theirs_opt.step()
                theirs_opt.zero_grad()

            ours.train()
            theirs.train()
            a, b = time_ms(ours_step, device, 1, args.repeats), time_ms(theirs_step, device, 1, args.repeats)
            rows.append([size, "train step", batch, a, b, f"{a / b:.2f}"])
        ours.eval()
        theirs.eval()
        for batch in (1, 8):
            pixels = torch.randn(batch, 3, 32, 32, device=device)
            prompt = torch.tensor([[2, 17, 23]] * batch, device=device)
            mask = torch.ones_like(prompt)
            hf_prompt = torch.cat([torch.full((batch, Q), VOCAB - 1, device=device), prompt], 1)
            kwargs = dict(num_beams=5, max_new_tokens=20, min_new_tokens=20, do_sample=False)
            a = time_ms(lambda: ours.generate(pixels, prompt, mask, **kwargs), device, 1, args.repeats)
            b = time_ms(lambda: theirs.generate(pixel_values=pixels, input_ids=hf_prompt, attention_mask=torch.ones_like(hf_prompt), **kwargs), device, 1, args.repeats)
            rows.append([size, "caption beam 5", batch, a, b, f"{a / b:.2f}"])
    print(f"stage 2, ours vs Blip2ForConditionalGeneration, LM {args.dtype}, {describe_machine(device)}")
    print_table(["LM", "what", "batch", "ours ms", "transformers ms", "ours/theirs"], rows)


if __name__ == "__main__":
    main()
