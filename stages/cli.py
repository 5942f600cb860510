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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer", description="BLIP-2 Q-Former two-stage trainer")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, device and parameter counts")
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", default="vitg", help="named config (vitg, vitl, tiny)")
    source.add_argument("--config", help="a model config file (JSON or YAML)")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"qformer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
