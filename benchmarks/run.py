"""One table of speed-ups, each row measured against its reference in the same run.

    python benchmarks/run.py                 # CPU, all rows (about 20 minutes on 2 cores)
    python benchmarks/run.py --rows stage1,rerank --device cuda

Each row is also appended, dated, to docs/benchmarks.csv (`--csv FILE` for another file, `--no-csv` for none).

Every measurement runs in its own process, so each one's peak memory (CUDA: max allocated; CPU: peak RSS of the
process, weights and inputs included) is its own. References:
- stage-1 step at the paper's shapes (bert-base Q-Former, 32 queries, ViT-g features [B, 257, 1408] given, text 32,
  ITC + ITM + ITG + AdamW): the previous commit's step, i.e. the formulation before image keys/values were shared
  (`tests/reference_stage1.py`) with torch's default AdamW (now fused);
- ITM re-rank at the paper's shapes: the same reference, pair by pair, each direction separately;
- stage-1 step with the real ViT-g/14 architecture (random weights): from the frozen-feature cache vs from pixels;
- Q-Former joint (ITM) pass forward + backward: transformers' Blip2QFormerModel with the same weights;
- torch.compile of the Q-Former vs eager, and gradient checkpointing vs none (memory);
- glibc's malloc defaults vs the freed memory kept in the process (`stages/memory.py`, which `qformer` applies at
  start and every other row applies too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from common import RESULTS_CSV, append_results, describe_machine, print_table, time_ms  # noqa: E402

DEC = 1


# --- measurements (each runs in a child process) -------------------------------------------------------------------
def paper_config(vision: str = "features"):
    """The paper's stage-1 model. With vision="features" the image encoder is a one-block stand-in of ViT-g's width:
    its input is ViT-g's output, so only its width matters, and 1B frozen parameters need not be built."""
    from qformer.config import VisionConfig, preset

    config = preset("vitg")
    config.vision_config.weights_path = None
    if vision == "features":
        config.vision_config = VisionConfig(model_name="vit_tiny_patch16_224", precision="fp32", drop_last_blocks=0,
                                            model_kwargs={"embed_dim": 1408, "depth": 1, "num_heads": 16})
    return config


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def text_batch(B: int, L: int, vocab: int, device):
    ids = torch.randint(1000, vocab - 1, (B, L), device=device)
    mask = torch.ones_like(ids)
    mask[B // 2:, L // 2:] = 0  # half the captions half as long
    return ids, mask


def stage1_step(device, precision: str, formulation: str, batch: int, vision: str = "features", compile: bool = False,
                checkpointing: bool = False, warmup: int = 1, repeats: int = 3) -> float:
    from qformer.losses import stage1_losses
    from qformer.stage1 import Stage1Model
    from stages.train.optim import configure_adamw, param_groups

    from reference_stage1 import reference_stage1_losses

    torch.manual_seed(0)
    config = paper_config(vision)
    model = Stage1Model(config).to(device).train()
    model.qformer.gradient_checkpointing = checkpointing
    if compile:
        model.qformer.compile()
    if formulation == "reference":  # the previous commit's optimiser too: torch's default (foreach) AdamW
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.98))
    else:
        optimizer = configure_adamw(model, 1e-4, 1e-5, 0.05, 10, 1000)["optimizer"]
    losses_of = reference_stage1_losses if formulation == "reference" else stage1_losses
    if formulation == "cached":  # the cache holds the frozen encoder's output; the model reads it instead of pixels
        images = torch.randn(batch, 257, model.visual_encoder.width, device=device)
    elif vision == "features":
        images = torch.randn(batch, 257, 1408, device=device)
    else:
        size = config.vision_config.image_size
        images = torch.randn(batch, 3, size, size, device=device)
    ids, mask = text_batch(batch, 32, config.qformer_config.vocab_size, device)

    def step():
        with autocast(device, precision):
            losses = losses_of(model, images, ids, mask, None, DEC)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_ms(step, device, warmup, repeats)


def rerank(device, precision: str, formulation: str, images: int, texts: int, k: int, batches: int | None,
           batch_size: int = 128) -> float:
    """Milliseconds for the whole re-rank; with `batches`, timed on the first `batches` pair batches and scaled to all."""
    import time

    from qformer.retrieval import RetrievalFeatures, itc_similarity, top_k_pairs
    from qformer.retrieval import rerank as ours_rerank
    from qformer.stage1 import Stage1Model

    from reference_stage1 import reference_rerank

    torch.manual_seed(0)
    config = paper_config()
    model = Stage1Model(config).to(device).eval()
    with torch.no_grad(), autocast(device, precision):
        image_embeds = model.ln_vision(torch.randn(images, 257, 1408, device=device))
        image_feats = model.image_feats(model.query_forward(image_embeds).last_hidden_state)
        ids, mask = text_batch(texts, 32, config.qformer_config.vocab_size, device)
        text_feat = model.text_feat(ids, mask)
    features = RetrievalFeatures(image_embeds, image_feats.float(), text_feat.float(), ids, mask)
    sim = itc_similarity(features.image_feats, features.text_feat)
    in_i2t, in_t2i = top_k_pairs(sim, k)
    pairs = int((in_i2t | in_t2i).sum()) if formulation == "ours" else int(in_i2t.sum() + in_t2i.sum())
    total_batches = -(-pairs // batch_size)
    limit = total_batches if batches is None else min(batches, total_batches)
    run = ours_rerank if formulation == "ours" else reference_rerank
    with autocast(device, precision):
        run(model, features, sim, k, batch_size, progress=lambda it: islice(it, 1))  # warm-up batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(model, features, sim, k, batch_size, progress=lambda it: islice(it, limit))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 * total_batches / limit


def qformer_joint(device, precision: str, formulation: str, batch: int = 8, warmup: int = 1, repeats: int = 3) -> float:
    from qformer_forward import CONFIGS, build_pair

    from qformer.masks import padding_mask, with_queries

    torch.manual_seed(0)
    config = CONFIGS["base"]
    ours, embeddings, theirs, query_tokens = build_pair(config, 32, device)
    image = torch.randn(batch, 257, 1408, device=device)
    ids, mask = text_batch(batch, 32, config.vocab_size, device)
    joint_mask = with_queries(32, mask).long()

    def step():
        with autocast(device, precision):
            if formulation == "ours":
                out = ours(ids, padding_mask(joint_mask), image_embeds=image).last_hidden_state
            else:
                embeds = embeddings(input_ids=ids, query_embeds=query_tokens.expand(batch, -1, -1))
                out = theirs(query_embeds=embeds, query_length=32, attention_mask=joint_mask, encoder_hidden_states=image).last_hidden_state
        out.float().sum().backward()

    return time_ms(step, device, warmup, repeats)


MEASUREMENTS = {"stage1_step": stage1_step, "rerank": rerank, "qformer_joint": qformer_joint}


def child(spec: dict) -> None:
    from stages.memory import keep_freed_memory

    if spec.pop("allocator", "keep") == "keep":  # as `qformer` sets it at start (stages/memory.py)
        keep_freed_memory()
    device = torch.device(spec.pop("device"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = MEASUREMENTS[spec.pop("measure")](device, **spec)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": ms, "peak_mib": peak / 2**20}))


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table --------------------------------------------------------------------------------------------------
def rows_to_run(args) -> list[tuple[str, str, dict, dict]]:
    """(row group, title, reference spec, this change's spec)."""
    dev = {"device": args.device}
    step = {**dev, "measure": "stage1_step", "batch": args.batch}
    rows = []
    for precision in args.precisions.split(","):
        rows.append(("stage1", f"stage-1 step, B={args.batch}, {precision}: previous commit -> this change",
                     {**step, "precision": precision, "formulation": "reference"},
                     {**step, "precision": precision, "formulation": "ours"}))
    rr = {**dev, "measure": "rerank", "precision": args.rerank_precision}
    for images, texts, k, batches in ((args.rerank_images, args.rerank_texts, args.k, args.rerank_batches),
                                      (args.small_rerank[0], args.small_rerank[1], args.small_rerank[2], None)):
        scope = "all batches" if batches is None else f"{batches} batches timed, scaled to all"
        shape = {"images": images, "texts": texts, "k": k, "batches": batches}
        rows.append(("rerank", f"ITM re-rank {images}x{texts}, k={k}, {args.rerank_precision} ({scope})",
                     {**rr, **shape, "formulation": "reference"}, {**rr, **shape, "formulation": "ours"}))
    vitg = {**step, "batch": args.vitg_batch, "vision": "vitg", "precision": args.vitg_precision}
    rows.append(("cache", f"stage-1 step, real ViT-g/14 (random weights), B={args.vitg_batch}, {args.vitg_precision}: "
                          f"pixels -> feature cache", {**vitg, "formulation": "ours"}, {**vitg, "formulation": "cached"}))
    joint = {**dev, "measure": "qformer_joint", "precision": args.precisions.split(",")[0]}
    rows.append(("transformers", "Q-Former joint pass fwd+bwd, B=8: transformers -> ours",
                 {**joint, "formulation": "transformers"}, {**joint, "formulation": "ours"}))
    ours_step = {**step, "precision": args.precisions.split(",")[-1], "formulation": "ours"}
    rows.append(("compile", f"stage-1 step, B={args.batch}, {ours_step['precision']}: eager -> torch.compile "
                            "(after compiling)", ours_step, {**ours_step, "compile": True, "warmup": 2}))
    rows.append(("checkpointing", f"stage-1 step, B={args.batch}, {ours_step['precision']}: "
                                  "plain -> gradient checkpointing", ours_step, {**ours_step, "checkpointing": True}))
    cached = {**vitg, "formulation": "cached"}
    rows.append(("allocator", f"stage-1 step from the cache, ViT-g, B={args.vitg_batch}, {args.vitg_precision}: "
                              "glibc's malloc defaults -> freed memory kept", {**cached, "allocator": "default"}, cached))
    return [r for r in rows if r[0] in args.rows.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="stage1,rerank,cache,transformers,compile,checkpointing,allocator")
    parser.add_argument("--precisions", default="fp32,bf16", help="stage-1 step precisions (bf16 = autocast)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rerank-images", type=int, default=64)
    parser.add_argument("--rerank-texts", type=int, default=320)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--rerank-batches", type=int, default=4, help="pair batches timed at the paper's shape (0: all)")
    parser.add_argument("--small-rerank", type=int, nargs=3, default=[24, 120, 8], metavar=("IMAGES", "TEXTS", "K"),
                        help="a re-rank run in full, to check the scaled one")
    parser.add_argument("--rerank-precision", default="bf16")
    parser.add_argument("--vitg-batch", type=int, default=2)
    parser.add_argument("--vitg-precision", default="fp32")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help="append every row, dated, to this CSV file")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    args.rerank_batches = args.rerank_batches or None

    table, results = [], []
    for _, title, reference, change in rows_to_run(args):
        before, after = measure(reference), measure(change)
        results.append({"row": title, "reference": f"{before['ms']:.0f}", "this": f"{after['ms']:.0f}", "unit": "ms",
                        "speedup": f"{before['ms'] / after['ms']:.2f}", "reference_peak_mib": f"{before['peak_mib']:.0f}",
                        "this_peak_mib": f"{after['peak_mib']:.0f}"})
        table.append([title, f"{before['ms']:.0f}", f"{after['ms']:.0f}", f"{before['ms'] / after['ms']:.2f}x",
                      f"{before['peak_mib']:.0f}", f"{after['peak_mib']:.0f}"])
        print(f"  {title}: {before['ms']:.0f} -> {after['ms']:.0f} ms", file=sys.stderr, flush=True)
    print(f"{describe_machine(torch.device(args.device))}; each row: reference -> this change, in one run")
    print_table(["measurement", "reference ms", "this ms", "speed-up", "reference peak MiB", "this peak MiB"], table)
    if not args.no_csv:
        command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
        append_results(results, describe_machine(torch.device(args.device)), command.strip(), args.csv)
        print(f"appended {len(results)} rows to {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
