"""`qformer info`: versions, the device, and what a model config holds."""

from __future__ import annotations

from pathlib import Path


def info(config: str = "vitg", train_vision: bool = False, image_size: int | None = None, batch_size: int | None = None) -> int:
    """Versions, device, and the architecture and parameter counts of a model (built on the meta device: no memory,
    no weights read); with --batch-size, the memory one GPU needs to train it (`qformer.footprint`).

    Args:
        config: a preset (vitg, vitl, tiny), a model config file (JSON/YAML) or an export folder of either stage
            (stage 2 when it has a language model).
        train_vision: plan for a run that trains the image encoder too (BLIP-2's fine-tuning).
        image_size: plan for this image size (default: the config's), e.g. 364 for BLIP-2's fine-tuning.
        batch_size: samples per GPU: print the training memory plan (weights, gradients, AdamW state, activations).
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
    if batch_size is not None:
        print_memory_plan(model_config, train_vision, image_size, batch_size)
    elif train_vision or image_size is not None:
        raise ValueError("--train-vision and --image-size plan a run's memory: give --batch-size too")
    return 0


def print_memory_plan(model_config, train_vision: bool, image_size: int | None, batch_size: int) -> None:
    from qformer.footprint import GB, training_footprint

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be at least 1, got {image_size}")
    plan = training_footprint(model_config, train_vision, image_size)
    stage = 1 if model_config.language_model is None else 2
    size = image_size or model_config.vision_config.image_size
    encoder = "trained" if train_vision else "frozen"
    print(f"training memory per GPU (stage {stage}, image encoder {encoder}, {size} px, batch {batch_size}, mixed precision):")
    print(f"  parameters trained       {plan.trained_parameters:>15,}")
    print(f"  weights                  {plan.weights / GB:>12.1f} GB (trained in fp32, frozen as their precision stores them)")
    print(f"  gradients                {plan.gradients / GB:>12.1f} GB")
    print(f"  optimizer state (AdamW)  {plan.optimizer / GB:>12.1f} GB")
    for checkpointing in (False, True):
        label = "with checkpointing" if checkpointing else "no checkpointing"
        print(f"  activations, {label:<18} {plan.activations.total(checkpointing) / GB:>6.2f} GB a sample, "
              f"{batch_size * plan.activations.total(checkpointing) / GB:.1f} GB a batch -> total "
              f"{plan.total(batch_size, checkpointing) / GB:.1f} GB")
    print("  (add 1-3 GB for the CUDA context and the allocator's cache; checkpointing: model.gradient_checkpointing)")
