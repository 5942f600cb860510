"""Model folders appear whole or not at all; bad weights, checkpoints and tokenizer files give one line naming them."""

import configparser
import json
import os
import pickle
import re
import textwrap
from pathlib import Path

import processes
import pytest
import torch

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.files import atomic_folder
from qformer.folders import load_stage1, save_stage1, save_stage2
from qformer.interop.lavis import import_lavis
from qformer.language_model import load_lm_tokenizer
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from qformer.vision import load_state_dict_file
from stages.cli import main
from stages.data.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
OPT = dict(model_type="opt", hidden_size=24, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=24,
           max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1)
TINY_EVA = {"model_name": "eva_giant_patch14_clip_224", "image_size": 32, "precision": "fp32",
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 4.0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety_data")
    make_dataset(folder, num_images=8, seed=0)
    return folder


def stage1(data):
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    return Stage1Model(config).eval(), tokenizer


def stage2(data):
    tokenizer = load_lm_tokenizer(LanguageModelConfig(tokenizer=str(data / "lm_tokenizer_decoder")))
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config={**OPT, "vocab_size": len(tokenizer)}, precision="fp32",
                                                tokenizer=str(data / "lm_tokenizer_decoder"), eos_text="</s>")
    return Stage2Model(config).eval(), tokenizer


def lightning_checkpoint(path: Path, data: Path, poison: str | None = None) -> Path:
    """What `qformer stage1 fit` writes, without the training: version, state dict, hyper-parameters."""
    import pytorch_lightning as pl

    from stages.train.stage1 import Stage1Module

    module = Stage1Module(config="tiny", tokenizer=str(data))
    state = module.state_dict()
    if poison:
        state[poison] = state[poison].clone().index_fill_(-1, torch.tensor([0]), float("nan"))
    torch.save({"pytorch-lightning_version": pl.__version__, "state_dict": state, "hyper_parameters": dict(module.hparams)}, path)
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qformer {argv[0]}") and ": error: " in lines[0], err
    return lines[0]


# --- 2. whole or not at all --------------------------------------------------------------------------------
def test_a_non_empty_folder_is_replaced_only_with_overwrite_and_then_as_a_whole(data, tmp_path):
    out = tmp_path / "export"
    save_stage2(*stage2(data), out)
    assert (out / "lm_tokenizer").is_dir()
    before = listing(out)
    model, tokenizer = stage1(data)
    with pytest.raises(ValueError, match=f"{out}.*--overwrite"):
        save_stage1(model, tokenizer, out)
    assert listing(out) == before
    save_stage1(model, tokenizer, out, overwrite=True)
    assert not (out / "lm_tokenizer").exists() and not (out / "language_model").exists()  # nothing of the stage-2 export
    assert load_stage1(out)[0].config.qformer_config.hidden_size == 32
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    save_stage1(model, tokenizer, empty)  # an existing empty folder needs no --overwrite, and is kept (a mount point may be)
    assert (empty / "qformer_export.json").is_file() and empty.stat().st_ino == inode
    assert leftovers(tmp_path) == []


def test_a_failed_export_leaves_no_folder_and_the_marker_comes_last(data, tmp_path, monkeypatch):
    model, tokenizer = stage1(data)
    out = tmp_path / "export"
    seen = []
    save_tokenizer = tokenizer.save_pretrained

    def save_then_fail(folder, **kwargs):
        seen.extend(p.name for p in tmp_path.rglob("qformer_export.json"))  # the marker must not exist yet
        save_tokenizer(folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_stage1(model, tokenizer, out)
    assert seen == [] and not out.exists() and leftovers(tmp_path) == []


def test_an_exception_keeps_the_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert listing(out) == {"keep.txt": b"old"} and leftovers(tmp_path) == []


def test_weight_files_get_the_permissions_of_any_other_file(data, tmp_path):
    previous = os.umask(0o022)
    try:
        save_stage2(*stage2(data), tmp_path / "export")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "export").rglob("*")]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_cli_export_twice_into_the_same_folder(data, tmp_path, capsys):
    checkpoint = lightning_checkpoint(tmp_path / "last.ckpt", data)
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    before = listing(out)
    line = one_line_error(capsys, ["export", str(checkpoint), "--out", str(out)])
    assert str(out) in line and "--overwrite" in line
    assert listing(out) == before
    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert load_stage1(out)[0] is not None and leftovers(tmp_path) == []


def test_sigterm_during_export_removes_the_partial_folder(data, tmp_path):
    checkpoint = lightning_checkpoint(tmp_path / "last.ckpt", data)
    out = tmp_path / "export"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import qformer.folders as export
        from stages.cli import main

        def killed(folder, stage):  # SIGTERM arrives once every file but the marker is written
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()

        export._write_marker = killed
        sys.exit(main(["export", {str(checkpoint)!r}, "--out", {str(out)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = processes.run(["-c", script], env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 128 + 15, result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_lavis_import_keeps_the_existing_export(data, tmp_path, capsys):
    from test_interop import lavis_state, tiny_stage1

    model, _ = tiny_stage1(data, eps=1e-5, vision=TINY_EVA)
    good = lavis_state(model)
    torch.save({"model": good}, tmp_path / "good.pth")
    out = tmp_path / "out"
    kwargs = dict(stage=1, bert=str(data), vision_config={**TINY_EVA, "ln_vision_eps": 1e-5}, num_attention_heads=2)
    import_lavis(tmp_path / "good.pth", out, **kwargs)
    before = listing(out)

    bad = {**good, "itm_head.weight": torch.zeros(3, 32), "visual_encoder.cls_token": torch.ones_like(good["visual_encoder.cls_token"])}
    torch.save({"model": bad}, tmp_path / "bad.pth")
    shape_error = r"bad\.pth: 1 tensor.*itm_head\.weight \(3, 32\) vs the model's \(2, 32\)"
    with pytest.raises(ValueError, match=shape_error):
        import_lavis(tmp_path / "bad.pth", tmp_path / "fresh", **kwargs)
    assert not (tmp_path / "fresh").exists()  # not even the encoder file, written before the check
    with pytest.raises(ValueError, match=shape_error):
        import_lavis(tmp_path / "bad.pth", out, overwrite=True, **kwargs)
    assert listing(out) == before and leftovers(tmp_path) == []

    argv = ["import", "lavis", str(tmp_path / "bad.pth"), "--out", str(out), "--stage", "1", "--bert", str(data), "--num-heads", "2",
            "--vision-config", json.dumps({**TINY_EVA, "ln_vision_eps": 1e-5})]
    assert "--overwrite" in one_line_error(capsys, argv)
    line = one_line_error(capsys, [*argv, "--overwrite"])
    assert "bad.pth" in line and "itm_head.weight (3, 32)" in line
    assert listing(out) == before and leftovers(tmp_path) == []


# --- 3. non-finite weights ----------------------------------------------------------------------------------
def test_export_refuses_nan_and_inf_weights(data, tmp_path, capsys):
    model, tokenizer = stage1(data)
    with torch.no_grad():
        model.qformer.query_tokens[0, 0, 0] = float("nan")
        model.itm_head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or inf values \(.*qformer\.query_tokens.*itm_head\.weight"):
        save_stage1(model, tokenizer, tmp_path / "export")
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []

    checkpoint = lightning_checkpoint(tmp_path / "nan.ckpt", data, poison="model.vision_proj.weight")
    line = one_line_error(capsys, ["export", str(checkpoint), "--out", str(tmp_path / "export")])
    assert "nan.ckpt" in line and "vision_proj.weight" in line
    assert not (tmp_path / "export").exists()


# --- 4. one line naming the file ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_model_safetensors_is_named(data, tmp_path, capsys, damage):
    out = save_stage1(*stage1(data), tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match=f"cannot read {weights}"):
        load_stage1(out)
    line = one_line_error(capsys, ["export-hf", str(out), "--out", str(tmp_path / "hf")])
    assert str(weights) in line and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("content", ["", "{not json"])
def test_damaged_tokenizer_json_is_named(data, tmp_path, capsys, content):
    out = save_stage1(*stage1(data), tmp_path / "export")
    (out / "tokenizer" / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json is not valid JSON"):
        load_stage1(out)
    assert str(out / "tokenizer" / "tokenizer.json") in one_line_error(capsys, ["export-hf", str(out), "--out", str(tmp_path / "hf")])

    lm_folder = tmp_path / "lm_tokenizer"
    load_lm_tokenizer(LanguageModelConfig(tokenizer=str(data / "lm_tokenizer_decoder"))).save_pretrained(str(lm_folder))
    (lm_folder / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=f"{lm_folder / 'tokenizer.json'} is not valid JSON"):
        load_lm_tokenizer(LanguageModelConfig(tokenizer=str(lm_folder)))


class Custom:
    pass


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_qformer_export_of_files_that_are_no_lightning_checkpoint(data, tmp_path, capsys):
    cases = {"weights.pth": ({"query_tokens": torch.zeros(1, 2, 4)}, "is not a Lightning checkpoint"),
             "text.ckpt": (b"hello, not a checkpoint\n", "cannot read .*text.ckpt as a torch checkpoint"),
             "empty.ckpt": (b"", "empty.ckpt: the file is empty"),
             "code.ckpt": ({"state_dict": RunsCode()}, r"code.ckpt: refused to unpickle GLOBAL posix\.system"),
             "class.ckpt": ({"state_dict": Custom()}, r"class.ckpt: refused to unpickle GLOBAL test_export_safety\.Custom")}
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        line = one_line_error(capsys, ["export", str(path), "--out", str(tmp_path / "export")])
        assert re.search(expected, line), line
        assert "weights_only=False" not in line and "likely succeed" not in line
    assert "not found" in one_line_error(capsys, ["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()


def test_weights_files_with_pickled_code_name_what_was_blocked(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    with open(path, "wb") as f:
        pickle.dump({"blocks.0.attn.qkv.weight": RunsCode()}, f)
    with pytest.raises(ValueError, match=r"eva_vit_g\.pth: refused to unpickle (GLOBAL posix\.system|Unsupported operand)") as error:
        load_state_dict_file(path)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)
    torch.save({"model": {"query_tokens": RunsCode()}}, path)
    with pytest.raises(ValueError, match=r"refused to unpickle GLOBAL posix\.system") as error:
        load_state_dict_file(path)
    assert "likely succeed" not in str(error.value)


# --- 5. a torch whose default load is weights-only ------------------------------------------------------------
def test_required_torch_loads_weights_only_by_default(tmp_path):
    """Lightning's --ckpt_path resume calls torch.load without weights_only: only torch >= 2.6 then refuses code."""
    from lightning_fabric.utilities.cloud_io import _load
    from packaging.requirements import Requirement
    from packaging.version import Version

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    torch_requirement = next(Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line.startswith("torch>"))
    assert not torch_requirement.specifier.contains("2.5.1") and torch_requirement.specifier.contains(Version(torch.__version__).base_version)
    torch.save({"state_dict": RunsCode()}, tmp_path / "resume.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        _load(str(tmp_path / "resume.ckpt"))
