"""Time and peak memory of `eval retrieval` (tiny model, CPU) on 1,000 images x 5,000 captions, projected to COCO 5k.

    python benchmarks/retrieval_eval.py [--images 1000] [--ks 16,128]

Rows: ITC only, and ITC top-k + ITM re-rank for each k. The projection scales the feature time by the number of
images + texts and the re-rank time by the number of re-ranked pairs, k x (images + texts).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qformer.bert import load_tokenizer
from qformer.config import preset
from qformer.stage1 import Stage1Model
from stages.data.synthetic import make_dataset
from stages.eval.common import EvalSet
from stages.eval.retrieval import evaluate_retrieval

from common import describe_machine, print_table  # noqa: E402

COCO_IMAGES, COCO_TEXTS = 5_000, 25_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--ks", default="16,128")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        make_dataset(folder, num_images=args.images, seed=0, val_fraction=0.0, test_fraction=1.0)
        tokenizer = load_tokenizer(folder)
        config = preset("tiny")
        config.qformer_config.vocab_size = len(tokenizer)
        model = Stage1Model(config).eval()
        data = EvalSet.load(f"{folder}/test.json", folder)
        rows = []
        for k in [None] + [int(k) for k in args.ks.split(",")]:
            start = time.perf_counter()
            result, _, _ = evaluate_retrieval(model, tokenizer, data, k_test=k or 1, itc_only=k is None, batch_size=args.batch_size, show_progress=False)
            seconds = time.perf_counter() - start
            images, texts = result["images"], result["texts"]
            scale = (COCO_IMAGES + COCO_TEXTS) / (images + texts)  # both the features and the pairs scale so
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([f"{images} x {texts}", "ITC only" if k is None else f"ITM re-rank k={k}", f"{seconds:.1f}", f"{peak:.0f}", f"{seconds * scale / 60:.1f}"])
    print(f"eval retrieval, tiny model, batch {args.batch_size}, {describe_machine(torch.device('cpu'))}")
    print_table(["set", "mode", "seconds", "peak RSS MiB", "COCO 5k projected min"], rows)


if __name__ == "__main__":
    main()
