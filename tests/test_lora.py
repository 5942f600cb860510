"""LoRA on the frozen LM: only the adapter (and the bridge) trains, exports keep it in PEFT's layout, `export-hf` merges
it (the same generations without PEFT), and a resumed run restores it."""

import json
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import transformers

pytest.importorskip("peft", reason="LoRA needs the peft package: pip install -e '.[lora]'")

from test_prompt_masking import llama_bpe  # noqa: E402

from qformer.config import LanguageModelConfig, LoraSettings, preset  # noqa: E402
from qformer.folders import load_stage2, save_stage2  # noqa: E402
from qformer.interop.hf import export_hf  # noqa: E402
from qformer.lora import is_adapter_key  # noqa: E402
from qformer.stage2 import Stage2Model  # noqa: E402
from stages.cli import main  # noqa: E402
from stages.data.synthetic import make_dataset  # noqa: E402
from stages.train.optim import param_groups  # noqa: E402
from stages.train.stage2 import Stage2Module  # noqa: E402

from tiny_models import write_stage1  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LMS = {
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=24, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                word_embed_proj_dim=24, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    "llama": dict(model_type="llama", vocab_size=300, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_data")
    make_dataset(folder, num_images=12, seed=0)
    return folder


@pytest.fixture(scope="module")
def stage1_export(data, tmp_path_factory):
    return write_stage1(data, tmp_path_factory.mktemp("stage1"))


def lm_tokenizer(data, lm: str):
    if lm == "llama":
        return llama_bpe()
    return transformers.AutoTokenizer.from_pretrained(str(data / "lm_tokenizer_decoder"), local_files_only=True)


def model_with_adapter(lm: str, tokenizer) -> Stage2Model:
    """A tiny stage-2 model whose adapter changes the LM's outputs (PEFT starts B at zero: it would change nothing)."""
    torch.manual_seed(0)
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config={**LMS[lm], "vocab_size": len(tokenizer)}, precision="fp32",
                                                lora=LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    model = Stage2Model(config).eval()
    with torch.no_grad():
        model.language_projection.weight.normal_(0, 0.5)
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_merged_generation_equals_the_adapters(data, tmp_path, lm):
    tokenizer = lm_tokenizer(data, lm)
    model = model_with_adapter(lm, tokenizer)
    save_stage2(model, tokenizer, tmp_path / "ours")
    assert (tmp_path / "ours" / "lm_adapter" / "adapter_config.json").is_file()  # PEFT's own layout
    assert not any(is_adapter_key(k) for k in load_stage2_keys(tmp_path / "ours"))
    loaded, _ = load_stage2(tmp_path / "ours")
    assert loaded.language_model.has_adapter

    pixels = torch.randn(2, 3, 32, 32)
    prompt = tokenizer(["a photo of", "a photo of"], return_tensors="pt")
    kwargs = dict(num_beams=2, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        adapter_ids = loaded.generate(pixels, prompt["input_ids"], prompt["attention_mask"], **kwargs)
        assert torch.equal(adapter_ids, model.generate(pixels, prompt["input_ids"], prompt["attention_mask"], **kwargs))
        with loaded.language_model.peft_model.disable_adapter():  # the adapter matters: without it, other words
            assert not torch.equal(loaded.generate(pixels, prompt["input_ids"], prompt["attention_mask"], **kwargs), adapter_ids)

    notes = export_hf(tmp_path / "ours", tmp_path / "hf")
    assert "the LoRA adapter is merged into the language model's weights" in notes
    assert not list((tmp_path / "hf").rglob("adapter_config.json"))
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    assert not any("lora" in k or "base_layer" in k for k in hf.state_dict())
    hf_ids = torch.cat([torch.full((2, preset("tiny").num_query_tokens), hf.config.image_token_index), prompt["input_ids"]], 1)
    with torch.no_grad():
        merged_ids = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **kwargs)
    assert torch.equal(merged_ids[:, hf_ids.shape[1]:], adapter_ids)


def load_stage2_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        return list(file.keys())


def test_only_the_adapter_and_the_bridge_train(stage1_export, data):
    module = Stage2Module(str(stage1_export), lm_config=LMS["opt"], lm_tokenizer=str(data / "lm_tokenizer_decoder"),
                          lm_precision="fp32", eos_text="</s>", lm_lora={"r": 4, "target_modules": ["q_proj", "v_proj", "fc1"]})
    model = module.model
    adapter = {n: p for n, p in model.named_parameters() if is_adapter_key(n)}
    assert len(adapter) == 2 * 3 * 2  # A and B, three layer kinds, two layers
    assert all(p.requires_grad for p in adapter.values())
    in_groups = {id(p) for group in param_groups(model, 0.05) for p in group["params"]}
    assert {id(p) for p in adapter.values()} <= in_groups
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("language_model.") and not is_adapter_key(k)}
    before = {k: v.detach().clone() for k, v in adapter.items()}
    model.train()
    assert not model.language_model.model.training  # the LM stays in eval mode; the adapter's dropout follows train()
    assert all(m.training for n, m in model.language_model.named_modules() if n.endswith("lora_dropout"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the first step moves B away from zero, the second then moves A too
        batch = {"pixel_values": torch.randn(4, 3, 32, 32), **module.lm_text(["a red circle"] * 4, [(0, i) for i in range(4)])}
        module._loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert all(not torch.equal(adapter[k], before[k]) for k in adapter)


def test_the_adapter_keeps_fp32_weights_whatever_the_lm_is_stored_in():
    """Its weights train: an fp16/bf16 copy would lose the small updates (precision auto casts the LM on its first run)."""
    from qformer.language_model import FrozenLanguageModel

    lm = FrozenLanguageModel(LanguageModelConfig(config=LMS["opt"], precision="bf16", lora=LoraSettings(r=2)))
    adapter = {n: p for n, p in lm.named_parameters() if is_adapter_key(n)}
    before = {n: p.detach().clone() for n, p in adapter.items()}
    lm.cast(torch.float16)  # what precision auto does on a GPU
    assert adapter and all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in adapter.items())
    assert {p.dtype for n, p in lm.named_parameters() if not is_adapter_key(n)} == {torch.float16}


def test_bad_lora_settings_are_one_line(stage1_export, data):
    common = dict(lm_config=LMS["opt"], lm_tokenizer=str(data / "lm_tokenizer_decoder"), lm_precision="fp32")
    for lora, message in [({"rank": 4}, r"model.lm_lora: unknown field\(s\) model.lm_lora.rank"),
                          ({"r": 0}, r"^language_model.lora.r \(the rank\) must be at least 1, got 0$"),
                          ({"target_modules": ["nope"]}, r"^language_model.lora.target_modules: Target modules \{'nope'\} not found")]:
        with pytest.raises(ValueError, match=message):
            Stage2Module(str(stage1_export), lm_lora=lora, **common)


class KeepCheckpointAt(pl.Callback):
    """Copies `last.ckpt` as written after optimizer step `step` (`model.save_every_n_steps 1`) to `path`."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            shutil.copy(trainer.checkpoint_callback.last_model_path, self.path)


def test_a_resumed_run_restores_the_adapter(stage1_export, data, tmp_path):
    """The LM comes from a folder, so checkpoints leave its weights out; the adapter trains and must be kept."""
    torch.manual_seed(0)
    lm_folder = tmp_path / "lm"
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**LMS["opt"])).save_pretrained(str(lm_folder))

    def fit(root: Path, *extra: str) -> dict:
        argv = ["stage2", "fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--model.stage1", str(stage1_export),
                "--model.lm_config", "null", "--model.lm_path", str(lm_folder), "--model.lm_tokenizer", str(data / "lm_tokenizer_decoder"),
                "--model.lm_lora", '{"r": 4}', "--model.warmup_steps", "1", "--model.val_caption", "false",
                "--data.train", str(data / "train.json"), "--data.val", "null", "--data.image_root", str(data), "--data.batch_size", "8",
                "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                "--model.save_every_n_steps", "1", *extra]  # a checkpoint after every step, the last one too
        assert main(argv) == 0
        return torch.load(root / "last.ckpt", weights_only=False)["state_dict"]  # the link to the latest run's

    keep = tmp_path / "step2.ckpt"
    callback = {"class_path": "test_lora.KeepCheckpointAt", "init_args": {"step": 2, "path": str(keep)}}
    uninterrupted = fit(tmp_path / "straight", "--trainer.callbacks", json.dumps([callback]))
    at_step_2 = torch.load(keep, weights_only=False)["state_dict"]
    adapter = [k for k in uninterrupted if is_adapter_key(k)]
    assert adapter and set(adapter) <= set(at_step_2)
    assert not [k for k in at_step_2 if k.startswith("model.language_model.") and not is_adapter_key(k)]
    assert not all(torch.equal(at_step_2[k], uninterrupted[k]) for k in adapter)  # step 3 moved the adapter
    resumed = fit(tmp_path / "resumed", "--ckpt_path", str(keep))
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
