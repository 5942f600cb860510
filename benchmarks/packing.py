"""Stage 2 with packed rows (qformer.packing) vs the padded batch, and transformers' Blip2ForConditionalGeneration,
same weights: one training step (forward + backward + AdamW on the trainable bridge) against a SmolLM2-shaped LM.

    python benchmarks/packing.py                       # SmolLM2-135M's shape, random weights, the demo's caption lengths
    python benchmarks/packing.py --batch 48 --threads 1

The LM has SmolLM2-135M's architecture (30 layers, 576 wide, grouped-query attention, 49,152 words) with random weights:
the speed does not depend on the weights. Each sample is 8 soft prompts + 8 to 21 text tokens (the range of the demo's
captions in SmolLM2's tokens, drawn uniformly), the LM in bf16 under autocast where the CPU multiplies bf16 natively
(as the demo runs), in fp32 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qformer.config import LanguageModelConfig, QFormerConfig, preset
from qformer.interop.names import to_hf_generation
from qformer.lm_text import IGNORE
from qformer.stage2 import Stage2Model
from stages.demo.settings import cpu_has_fast_bf16

from common import describe_machine, print_table, time_ms  # noqa: E402

VOCAB = 49152
SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)
TEXT_TOKENS = (8, 21)


def build() -> Stage2Model:
    config = preset("tiny")
    config.qformer_config = QFormerConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                          encoder_hidden_size=32)
    config.num_query_tokens = 8  # the demo's
    config.language_model = LanguageModelConfig(config=SMOLLM2_SHAPE, precision="fp32")
    return Stage2Model(config)


def text_batch(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels of `batch` texts of 8 to 21 tokens; the first three tokens ("a photo of") unlabelled."""
    rng = random.Random(seed)
    lengths = [rng.randint(*TEXT_TOKENS) for _ in range(batch)]
    ids = torch.randint(3, VOCAB - 1, (batch, max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE
    return ids, mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=24, help="the demo's SmolLM2 batch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    ours = build()
    theirs = to_hf_generation(ours, image_token_index=VOCAB - 1)
    theirs.language_model.config._attn_implementation = "eager"  # ours trains with eager attention on a CPU too
    trainable = [p for p in ours.parameters() if p.requires_grad]
    theirs_trainable = [p for n, p in theirs.named_parameters() if not n.startswith(("language_model.", "vision_model."))]
    for p in theirs.parameters():
        p.requires_grad_(any(p is q for q in theirs_trainable))
    ours_opt, theirs_opt = torch.optim.AdamW(trainable), torch.optim.AdamW(theirs_trainable)
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    batches = [text_batch(args.batch, seed) for seed in range(8)]
    pixels = torch.randn(args.batch, 3, 32, 32)
    Q = ours.config.num_query_tokens

    def ours_step(packed: bool):
        ours.language_model.packs_sequences = packed
        for ids, mask, labels in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = ours(pixels, ids, mask, labels)
            loss.backward()
            ours_opt.step()
            ours_opt.zero_grad()

    def theirs_step():
        for ids, mask, labels in batches:
            hf_ids = torch.cat([torch.full((args.batch, Q), VOCAB - 1), ids], 1)
            hf_mask = torch.cat([torch.ones(args.batch, Q, dtype=mask.dtype), mask], 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = theirs(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask).logits[:, Q - 1 : -1]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
            loss.backward()
            theirs_opt.step()
            theirs_opt.zero_grad()

    ours.train()
    theirs.train()
    steps = len(batches)
    padded = time_ms(lambda: ours_step(False), device, 1, args.repeats) / steps
    packed = time_ms(lambda: ours_step(True), device, 1, args.repeats) / steps
    reference = time_ms(theirs_step, device, 1, args.repeats) / steps
    real = sum(int(mask.sum()) + Q * len(mask) for _, mask, _ in batches)
    padded_positions = sum(mask.numel() + Q * len(mask) for _, mask, _ in batches)
    print(f"stage-2 train step, SmolLM2-135M-shaped LM ({'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}), batch "
          f"{args.batch}, 8 soft prompts + {TEXT_TOKENS[0]}-{TEXT_TOKENS[1]} text tokens ({1 - real / padded_positions:.0%} "
          f"of the padded positions are padding), {describe_machine(device)}")
    print_table(["what", "ms / step", "vs transformers"], [
        ["transformers Blip2ForConditionalGeneration (padded)", reference, "1.00"],
        ["ours, padded", padded, f"{reference / padded:.2f}x"],
        ["ours, packed (2 samples per row)", packed, f"{reference / packed:.2f}x"],
    ])


if __name__ == "__main__":
    main()
