"""`qformer export`: a training checkpoint -> a self-describing model folder."""

from __future__ import annotations


def export(checkpoint: str, *, out: str, overwrite: bool = False) -> int:
    """Write a self-describing model folder (weights, config, tokenizer) from a training checkpoint of either stage.

    Args:
        checkpoint: a .ckpt written by `qformer stage1 fit` or `qformer stage2 fit` (e.g. ROOT/last.ckpt).
        out: the export folder to write.
        overwrite: replace an existing non-empty --out folder (as a whole, once the new one is complete).
    """
    from qformer.files import check_out, read_torch
    from qformer.folders import save_stage1, save_stage2
    from stages.train.stage1 import Stage1Module
    from stages.train.stage2 import Stage2Module

    check_out(out, overwrite)
    content = read_torch(checkpoint)
    if not isinstance(content, dict) or not {"pytorch-lightning_version", "state_dict"} <= set(content):
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no pytorch-lightning_version and state_dict): "
                         "give a .ckpt written by qformer stage1/stage2 fit")
    if "stage1" in content.get("hyper_parameters", {}):
        module = Stage2Module.load_from_checkpoint(checkpoint, map_location="cpu")
        folder = save_stage2(module.model, module.lm_tokenizer, out, overwrite, source=checkpoint)
    else:
        module = Stage1Module.load_from_checkpoint(checkpoint, map_location="cpu")
        folder = save_stage1(module.model, module.tokenizer, out, overwrite, source=checkpoint)
    print(f"exported to {folder}")
    return 0
