"""`qformer info`: versions, the device, and what a model config holds."""

from __future__ import annotations

from pathlib import Path


def info(config: str = "vitg") -> int:
    """Versions, device, and the architecture and parameter counts of a model (built on the meta device: no memory,
    no weights read).

    Args:
        config: a preset (vitg, vitl, tiny), a model config file (JSON/YAML) or an export folder of either stage.
    """
    import pytorch_lightning
    import timm
    import torch
    import torchmetrics
    import transformers

    from qformer.accounting import stage1_parameter_counts, stage2_parameter_counts
    from qformer.config import resolve_config
    from qformer.folders import read_config, read_export_info

    if Path(config).is_dir():
        read_export_info(config)  # a folder must be an export: say so if it is not
        model_config = read_config(config)
    else:
        model_config = resolve_config(config)
    print("versions:")
    for module in (torch, pytorch_lightning, timm, transformers, torchmetrics):
        print(f"  {module.__name__:<18} {module.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: cuda x{torch.cuda.device_count()} ({names})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    vc, qc, lm = model_config.vision_config, model_config.qformer_config, model_config.language_model
    print(f"config: {config}")
    print(f"  image encoder   {vc.model_name} (last {vc.drop_last_blocks} block(s) dropped), {qc.encoder_hidden_size} wide")
    print(f"  q-former        {qc.num_hidden_layers} layers x {qc.hidden_size}, {model_config.num_query_tokens} queries")
    if lm is not None:
        print(f"  language model  {lm.path or (lm.config or {}).get('model_type')} (frozen, precision {lm.precision})")
    for stage, counts in (("stage-1", stage1_parameter_counts(model_config)),) + (
            (("stage-2", stage2_parameter_counts(model_config)),) if lm is not None else ()):
        print(f"{stage} parameters:")
        for name, value in counts.items():
            print(f"  {name:<10} {value:>15,}")
    return 0
