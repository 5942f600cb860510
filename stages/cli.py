"""The `qformer` command. Each subcommand is a small function; training subcommands hand over to LightningCLI."""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, device, and parameter counts of a named preset or a config file."""
    import pytorch_lightning
    import timm
    import torch
    import torchmetrics
    import transformers

    from qformer.accounting import stage1_parameter_counts
    from qformer.config import Blip2Config, preset

    print("versions:")
    for module in (torch, pytorch_lightning, timm, transformers, torchmetrics):
        print(f"  {module.__name__:<18} {module.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: cuda x{torch.cuda.device_count()} ({names})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    config = Blip2Config.from_file(args.config) if args.config else preset(args.preset)
    counts = stage1_parameter_counts(config)
    vc, qc = config.vision_config, config.qformer_config
    print(f"config: {args.config or 'preset ' + args.preset}")
    print(f"  image encoder   {vc.model_name} (last {vc.drop_last_blocks} block(s) dropped), {qc.encoder_hidden_size} wide")
    print(f"  q-former        {qc.num_hidden_layers} layers x {qc.hidden_size}, {config.num_query_tokens} queries")
    print("stage-1 parameters:")
    for name, value in counts.items():
        print(f"  {name:<10} {value:>15,}")
    return 0


def run_stage(stage: str, argv: list[str]) -> int:
    """`qformer stage1|stage2 {fit,validate} --config FILE ...`: LightningCLI over the stage's module + CaptionDataModule."""
    import importlib.util

    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from qformer.files import unpickling_refusal
    from stages.data import AnnotationError, CaptionDataModule
    from stages.images import UnreadableImage
    from stages.skeleton import TrainingStopped
    from stages.stage1 import Stage1Module
    from stages.stage2 import Stage2Module

    class QFormerCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            """Unless --trainer.logger says otherwise: CSV logs always, TensorBoard too when it is installed."""
            super().instantiate_classes()
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.trainer.logger in (None, True):
                csv = CSVLogger(self.trainer.default_root_dir)
                loggers = [csv]
                if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                    loggers.append(TensorBoardLogger(self.trainer.default_root_dir, version=csv.version))
                self.trainer.loggers = loggers

    module = Stage1Module if stage == "stage1" else Stage2Module
    try:
        QFormerCLI(module, CaptionDataModule, args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": f"qformer {stage}"})
    except (AnnotationError, UnreadableImage, FileNotFoundError, TrainingStopped, pickle.UnpicklingError) as error:
        if os.environ.get("QFORMER_DEBUG"):
            raise
        message = unpickling_refusal(error)
        message = f"--ckpt_path: {message}" if message else str(error)
        print(f"qformer {stage}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, TrainingStopped) else 2
    return 0


OVERWRITE_HELP = "replace an existing non-empty --out folder (as a whole, once the new one is complete)"


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits():
    """While a command writes a model folder, `kill` (SIGTERM) raises SystemExit, so the half-written
    `.NAME.partial-*` folder is removed on the way out (a `kill -9` leaves it; it is safe to delete)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_export(args: argparse.Namespace) -> int:
    """A Lightning checkpoint of either stage -> a self-describing export folder."""
    from qformer.export import save_stage1, save_stage2
    from qformer.files import check_out, read_torch
    from stages.stage1 import Stage1Module
    from stages.stage2 import Stage2Module

    check_out(args.out, args.overwrite)
    checkpoint = read_torch(args.checkpoint)
    if not isinstance(checkpoint, dict) or not {"pytorch-lightning_version", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{args.checkpoint} is not a Lightning checkpoint (no pytorch-lightning_version and state_dict): "
                         "give a .ckpt written by qformer stage1/stage2 fit")
    with _sigterm_exits():
        if "stage1" in checkpoint.get("hyper_parameters", {}):
            module = Stage2Module.load_from_checkpoint(args.checkpoint, map_location="cpu")
            out = save_stage2(module.model, module.lm_tokenizer, args.out, args.overwrite, source=args.checkpoint)
        else:
            module = Stage1Module.load_from_checkpoint(args.checkpoint, map_location="cpu")
            out = save_stage1(module.model, module.tokenizer, args.out, args.overwrite, source=args.checkpoint)
    print(f"exported to {out}")
    return 0


def _generate_for_images(args, paths, prompt_for) -> tuple[list[dict], int]:
    """Generation over the readable images in batches, each decoded once; unreadable ones are named and counted."""
    import torch

    from qformer.export import load_stage2
    from qformer.stage2 import generate_text
    from stages.data import eval_transform
    from stages.images import IMAGE_SUFFIXES, SkippedImages, load_pixels

    if not paths:
        raise ValueError("no image files given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    model, tokenizer = load_stage2(args.model)
    device = torch.device(args.device)
    model.to(device)
    transform = eval_transform(model.config.vision_config.image_size)
    prompt = prompt_for(model)
    results, skipped = [], SkippedImages()
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        pixels, kept = load_pixels(chunk, transform, skipped, args.max_image_pixels)
        if pixels is not None:
            texts = generate_text(model, tokenizer, pixels.to(device), [prompt] * len(kept), **args.generation)
            results.extend({"image": str(chunk[i]), "text": t} for i, t in zip(kept, texts))
    return results, len(skipped)


def cmd_caption(args: argparse.Namespace) -> int:
    """One caption per image (beam search by default), printed as `path<TAB>caption` or JSON."""
    import json

    args.generation = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                           length_penalty=args.length_penalty, repetition_penalty=args.repetition_penalty, top_p=args.top_p)
    from stages.images import image_files

    results, failed = _generate_for_images(args, image_files(args.images), lambda model: args.prompt)
    if args.json:
        print(json.dumps([{"image": r["image"], "caption": r["text"]} for r in results], indent=2))
    else:
        for r in results:
            print(f"{r['image']}\t{r['text']}")
    if failed:
        print(f"{failed} image(s) could not be read, {len(results)} captioned", file=sys.stderr)
    if not results:
        print("qformer caption: error: no image could be read", file=sys.stderr)
    return 1 if failed else 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Zero-shot visual question answering with the paper's prompt for the LM's family."""
    from qformer.stage2 import VQA_PROMPTS

    def prompt_for(model) -> str:
        template = args.prompt_template or VQA_PROMPTS["encoder_decoder" if model.is_encoder_decoder else "decoder"]
        return template.format(args.question)

    args.generation = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=1, length_penalty=args.length_penalty)
    args.batch_size = 1
    results, failed = _generate_for_images(args, [args.image], prompt_for)
    for r in results:
        print(r["text"])
    return 1 if failed else 0


def cmd_make_data(args: argparse.Namespace) -> int:
    """Write the built-in synthetic image-caption dataset."""
    from stages.synthetic import make_dataset

    counts = make_dataset(args.folder, args.num_images, args.seed, args.image_size, args.val_images, args.test_images)
    print(f"wrote {sum(counts.values())} images to {args.folder}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _write_json(path: str | None, data) -> None:
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def cmd_eval(args: argparse.Namespace) -> int:
    """`qformer eval retrieval|caption|vqa`: the paper's evaluations; sharded when launched with torchrun."""
    from pathlib import Path

    import torch

    from qformer.export import load_stage1, load_stage2
    from stages import evaluate as ev

    rank, world = ev.init_distributed(args.device)
    device = ev.device_for(args.device, rank)
    show = not args.no_progress
    if args.task == "retrieval":
        model, tokenizer = load_stage1(args.model)
        data = ev.EvalSet.load(args.data, args.images, args.max_image_pixels, args.allow_outside_root)
        scores, i2t, t2i = ev.evaluate_retrieval(model.to(device), tokenizer, data, args.k_test, args.itc_only, args.batch_size, rank, world, show)
        if args.save_scores and rank == 0:
            torch.save({"score_i2t": i2t.cpu(), "score_t2i": t2i.cpu()}, args.save_scores)
        title = f"retrieval on {args.data} ({'ITC only' if args.itc_only else f'ITC top-{args.k_test} + ITM re-rank'})"
    elif args.task == "caption":
        model, tokenizer = load_stage2(args.model)
        data = ev.EvalSet.load(args.data, args.images, args.max_image_pixels, args.allow_outside_root)
        generation = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
        scores, captions, notices = ev.evaluate_captions(model.to(device), tokenizer, data, args.prompt, args.batch_size, generation, rank, world, show)
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
        if args.predictions and rank == 0:
            _write_json(args.predictions, [{"image_id": k, "caption": v} for k, v in captions.items()])
        title = f"captioning on {args.data}"
    else:
        from qformer.stage2 import VQA_PROMPTS

        model, tokenizer = load_stage2(args.model)
        questions = ev.load_questions(args.data, args.allow_outside_root)
        prompt = args.prompt_template or VQA_PROMPTS["encoder_decoder" if model.is_encoder_decoder else "decoder"]
        generation = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=1, length_penalty=args.length_penalty)
        scores, predictions = ev.evaluate_vqa(model.to(device), tokenizer, questions, Path(args.images), prompt, args.batch_size, generation,
                                              show, args.max_image_pixels, args.allow_outside_root)
        if args.predictions:
            _write_json(args.predictions, predictions)
        title = f"zero-shot VQA on {args.data} (prompt {prompt!r})"
    if rank == 0:
        ev.print_scores(title, scores)
        _write_json(args.json, scores)
    if scores.get("nonfinite_features"):
        print(f"qformer eval: error: the model gives non-finite features ({scores['nonfinite_features']} images/texts): "
              "its weights have diverged", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: stage 1, stage 2 and evaluation end to end on built-in synthetic data."""
    from stages.demo import DemoSettings, run_demo

    settings = DemoSettings(out=args.out, lm=args.lm, seed=args.seed, num_images=args.num_images, val_images=args.val_images,
                            test_images=args.test_images, lm_steps=args.lm_steps, stage1_steps=args.stage1_steps,
                            stage2_steps=args.stage2_steps)
    run_demo(settings)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """`qformer import lavis|hf`: convert a LAVIS or transformers BLIP-2 checkpoint into an export folder."""
    import json

    from qformer import interop

    with _sigterm_exits():
        if args.source == "lavis":
            vision_config = json.loads(args.vision_config) if args.vision_config else None
            notes = interop.import_lavis(args.checkpoint, args.out, args.stage, args.vision_weights, args.lm, args.bert,
                                         vision_config, args.num_heads, args.overwrite)
        else:
            notes = interop.import_hf(args.checkpoint, args.out, args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"imported {args.checkpoint} into {args.out}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """Our export folder -> a transformers Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration folder."""
    from qformer.interop import export_hf

    with _sigterm_exits():
        notes = export_hf(args.folder, args.out, args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote a transformers BLIP-2 folder to {args.out}")
    return 0


def add_image_limit(parser: argparse.ArgumentParser) -> None:
    from stages.images import DEFAULT_MAX_IMAGE_PIXELS

    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="skip images whose header declares more pixels, before decoding (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 Q-Former two-stage trainer")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and parameter counts")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", default="vitg", help="named config (vitg, vitl, tiny)")
    source.add_argument("--config", help="a model config file (JSON or YAML)")
    info.set_defaults(func=cmd_info)

    from stages.demo import DemoSettings

    defaults = DemoSettings()
    demo = commands.add_parser("demo", help="run stage 1, stage 2 and evaluation end to end on built-in data (CPU, ~10 min)")
    demo.add_argument("--out", default=defaults.out, help="folder for data, configs, runs, exports and results")
    demo.add_argument("--lm", choices=["opt", "t5"], default=defaults.lm, help="decoder-only (OPT) or encoder-decoder (T5) LM")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--num-images", type=int, default=defaults.num_images)
    demo.add_argument("--val-images", type=int, default=defaults.val_images)
    demo.add_argument("--test-images", type=int, default=defaults.test_images)
    demo.add_argument("--lm-steps", type=int, default=defaults.lm_steps)
    demo.add_argument("--stage1-steps", type=int, default=defaults.stage1_steps)
    demo.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps)
    demo.set_defaults(func=cmd_demo)

    commands.add_parser("stage1", help="stage-1 training: qformer stage1 {fit,validate} --config FILE", add_help=False)
    commands.add_parser("stage2", help="stage-2 training: qformer stage2 {fit,validate} --config FILE --model.stage1 DIR", add_help=False)

    caption = commands.add_parser("caption", help="caption images with a stage-2 model")
    caption.add_argument("images", nargs="+", help="image files or folders")
    caption.add_argument("--model", required=True, help="stage-2 export folder")
    caption.add_argument("--prompt", default="a photo of", help='text the caption continues ("" for none)')
    caption.add_argument("--num-beams", type=int, default=5)
    caption.add_argument("--max-new-tokens", type=int, default=30)
    caption.add_argument("--min-new-tokens", type=int, default=8)
    caption.add_argument("--length-penalty", type=float, default=1.0)
    caption.add_argument("--repetition-penalty", type=float, default=1.0)
    caption.add_argument("--top-p", type=float, default=None, help="nucleus sampling instead of beam search")
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--device", default="cpu")
    caption.add_argument("--json", action="store_true", help="print a JSON list instead of path<TAB>caption lines")
    add_image_limit(caption)
    caption.set_defaults(func=cmd_caption)

    ask = commands.add_parser("ask", help="answer a question about an image (zero-shot VQA)")
    ask.add_argument("image")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="stage-2 export folder")
    ask.add_argument("--prompt-template", default=None, help='default: "Question: {} Answer:" (OPT), "Question: {} Short answer:" (T5)')
    ask.add_argument("--num-beams", type=int, default=5)
    ask.add_argument("--max-new-tokens", type=int, default=10)
    ask.add_argument("--length-penalty", type=float, default=-1.0)
    ask.add_argument("--device", default="cpu")
    add_image_limit(ask)
    ask.set_defaults(func=cmd_ask)

    export = commands.add_parser("export", help="write a model folder from a training checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    export.set_defaults(func=cmd_export)

    evaluation = commands.add_parser("eval", help="retrieval, captioning or zero-shot VQA evaluation")
    tasks = evaluation.add_subparsers(dest="task", required=True)
    for task, text in (("retrieval", "image-text retrieval (stage-1 model)"), ("caption", "captioning metrics (stage-2 model)"), ("vqa", "zero-shot VQAv2 accuracy (stage-2 model)")):
        sub = tasks.add_parser(task, help=text)
        sub.add_argument("--model", required=True, help="export folder")
        sub.add_argument("--data", required=True, help="annotation file" if task != "vqa" else "question file")
        sub.add_argument("--images", required=True, help="image root folder")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--device", default="cpu")
        sub.add_argument("--json", help="also write the scores to this JSON file")
        sub.add_argument("--no-progress", action="store_true")
        add_image_limit(sub)
        sub.add_argument("--allow-outside-root", action="store_true",
                         help="read annotation paths that lead outside --images (absolute, '..', symbolic links)")
        sub.set_defaults(func=cmd_eval)
        if task == "retrieval":
            sub.add_argument("--k-test", type=int, default=128, help="candidates re-ranked with ITM per query")
            sub.add_argument("--itc-only", action="store_true", help="rank by ITC similarity alone")
            sub.add_argument("--save-scores", help="torch file with both score matrices (-100 outside each top-k)")
        else:
            sub.add_argument("--num-beams", type=int, default=5)
            sub.add_argument("--predictions", help="write the generated texts to this JSON file")
        if task == "caption":
            sub.add_argument("--prompt", default="a photo of")
            sub.add_argument("--max-new-tokens", type=int, default=30)
            sub.add_argument("--min-new-tokens", type=int, default=8)
        if task == "vqa":
            sub.add_argument("--prompt-template", default=None, help='default: "Question: {} Answer:" (OPT), "Question: {} Short answer:" (T5)')
            sub.add_argument("--max-new-tokens", type=int, default=10)
            sub.add_argument("--length-penalty", type=float, default=-1.0)

    importer = commands.add_parser("import", help="convert a LAVIS or transformers BLIP-2 checkpoint into an export folder")
    sources = importer.add_subparsers(dest="source", required=True)
    lavis = sources.add_parser("lavis", help="a LAVIS blip2 / blip2_feature_extractor / blip2_opt / blip2_t5 .pth")
    lavis.add_argument("checkpoint")
    lavis.add_argument("--out", required=True)
    lavis.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    lavis.add_argument("--stage", type=int, choices=[1, 2], help="check that the checkpoint is of this stage")
    lavis.add_argument("--vision-weights", help="image encoder weights (LAVIS's eva_vit_g.pth or timm format) when the checkpoint has none")
    lavis.add_argument("--lm", help="stage 2: local folder of the frozen LLM (OPT / FlanT5)")
    lavis.add_argument("--bert", help="stage 1: local bert-base-uncased folder (tokenizer)")
    lavis.add_argument("--vision-config", help='JSON VisionConfig fields, e.g. \'{"model_name": "eva_giant_patch14_clip_224", "image_size": 364}\'')
    lavis.add_argument("--num-heads", type=int, help="Q-Former attention heads (default: width / 64, as BERT)")
    lavis.set_defaults(func=cmd_import)
    hf = sources.add_parser("hf", help="a transformers Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration folder")
    hf.add_argument("checkpoint", help="the folder")
    hf.add_argument("--out", required=True)
    hf.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    hf.set_defaults(func=cmd_import)

    export_hf = commands.add_parser("export-hf", help="write a folder transformers' Blip2 classes load with from_pretrained")
    export_hf.add_argument("folder", help="our export folder (either stage)")
    export_hf.add_argument("--out", required=True)
    export_hf.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    export_hf.set_defaults(func=cmd_export_hf)

    make_data = commands.add_parser("make-data", help="write the built-in synthetic dataset")
    make_data.add_argument("folder")
    make_data.add_argument("--num-images", type=int, default=1000)
    make_data.add_argument("--seed", type=int, default=0)
    make_data.add_argument("--image-size", type=int, default=64)
    make_data.add_argument("--val-images", type=int, default=None, help="validation images (default: 10%% of --num-images)")
    make_data.add_argument("--test-images", type=int, default=None, help="test images (default: 10%% of --num-images)")
    make_data.set_defaults(func=cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars: noise on the command line
    if argv[:1] in (["stage1"], ["stage2"]):
        return run_stage(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"qformer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
