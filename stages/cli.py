"""The `qformer` command. Each subcommand is a small function; training subcommands hand over to LightningCLI."""

from __future__ import annotations

import argparse
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


def run_stage1(argv: list[str]) -> int:
    """`qformer stage1 {fit,validate} --config FILE ...`: LightningCLI over Stage1Module + CaptionDataModule."""
    from pytorch_lightning.cli import LightningCLI

    from stages.data import CaptionDataModule
    from stages.stage1 import Stage1Module

    LightningCLI(
        Stage1Module,
        CaptionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "qformer stage1"},
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A Lightning checkpoint -> a self-describing export folder (trainable weights, config, tokenizer)."""
    from qformer.export import save_stage1
    from stages.stage1 import Stage1Module

    module = Stage1Module.load_from_checkpoint(args.checkpoint, map_location="cpu")
    out = save_stage1(module.model, module.tokenizer, args.out)
    print(f"exported stage-1 model to {out}")
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    """Write the built-in synthetic image-caption dataset."""
    from stages.synthetic import make_dataset

    counts = make_dataset(args.folder, args.num_images, args.seed, args.image_size)
    print(f"wrote {sum(counts.values())} images to {args.folder}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 Q-Former two-stage trainer")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and parameter counts")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", default="vitg", help="named config (vitg, vitl, tiny)")
    source.add_argument("--config", help="a model config file (JSON or YAML)")
    info.set_defaults(func=cmd_info)

    commands.add_parser("stage1", help="stage-1 training: qformer stage1 {fit,validate} --config FILE", add_help=False)

    export = commands.add_parser("export", help="write a model folder from a training checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(func=cmd_export)

    make_data = commands.add_parser("make-data", help="write the built-in synthetic dataset")
    make_data.add_argument("folder")
    make_data.add_argument("--num-images", type=int, default=1000)
    make_data.add_argument("--seed", type=int, default=0)
    make_data.add_argument("--image-size", type=int, default=64)
    make_data.set_defaults(func=cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stage1"]:
        return run_stage1(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"qformer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
