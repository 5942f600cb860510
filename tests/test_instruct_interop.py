"""InstructBLIP both ways: export-hf / import hf with transformers' own classes, and LAVIS's instruct checkpoints."""

import pytest
import torch
import transformers
from PIL import Image

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import load_stage2, save_stage2
from qformer.generation import GenerationSettings
from qformer.instruction import instruction_tokens
from qformer.interop.hf import export_hf, import_hf
from qformer.interop.lavis import import_lavis
from qformer.interop.names import lavis_key
from qformer.stage2 import Stage2Model
from stages.data.synthetic import make_dataset
from test_interop import LMS, TINY_EVA

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instruct_interop_data")
    make_dataset(folder, num_images=4, seed=0)
    return folder


def instruct_model(data, lm: str, vision=None, seed=0):
    kind = "t5" if lm == "t5" else "decoder"
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / f"lm_tokenizer_{kind}"), local_files_only=True)
    torch.manual_seed(seed)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(load_tokenizer(data))
    config.vision_config.ln_vision_eps = 1e-6
    if vision:
        config.vision_config = type(config.vision_config)(**{**config.vision_config.__dict__, **vision})
    config.language_model = LanguageModelConfig(config={**LMS[lm], "vocab_size": len(lm_tokenizer)}, precision="fp32",
                                                tokenizer=str(data / f"lm_tokenizer_{kind}"), eos_text="</s>" if kind == "decoder" else None)
    config.qformer_text_input = True
    model = Stage2Model(config).eval()
    model.instruction_tokenizer = load_tokenizer(data)
    with torch.no_grad():
        model.language_projection.weight.normal_(0, 0.5)
        model.qformer.embeddings.word_embeddings.weight.normal_(0, 0.5)
    return model, lm_tokenizer


def test_export_hf_loads_in_transformers_and_generates_what_ask_prints(data, tmp_path, capsys):
    """The acceptance check: InstructBlipForConditionalGeneration + InstructBlipProcessor from our folder, on an image
    file and an instruction, give the text `qformer ask` prints; then import hf gives our model back."""
    from stages.apps.generate import ask

    model, lm_tokenizer = instruct_model(data, "opt")
    save_stage2(model, lm_tokenizer, tmp_path / "ours")
    notes = export_hf(tmp_path / "ours", tmp_path / "hf")
    assert any("<image>" in n for n in notes)
    hf = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.InstructBlipProcessor.from_pretrained(str(tmp_path / "hf"))
    image = next(data.glob("images/*.png"))
    instruction = "what color is the circle ?"
    inputs = processor(images=Image.open(image).convert("RGB"), text=instruction, return_tensors="pt")
    Q = model.config.num_query_tokens
    assert (inputs["input_ids"][0, :Q] == hf.config.image_token_index).all()
    assert torch.equal(inputs["qformer_input_ids"], instruction_tokens(model.instruction_tokenizer, [instruction])["qformer_input_ids"])

    greedy = GenerationSettings(num_beams=1, max_new_tokens=5, min_new_tokens=5)
    assert ask(str(image), instruction, model=str(tmp_path / "ours"), generation=greedy) == 0
    printed = capsys.readouterr().out.strip()
    with torch.no_grad():
        ids = hf.generate(**inputs, num_beams=1, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    theirs = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].split("</s>")[0].strip()
    assert printed and printed == theirs, (printed, theirs)

    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _ = load_stage2(tmp_path / "back")
    assert back.config.qformer_text_input and back.instruction_tokenizer.get_vocab() == model.instruction_tokenizer.get_vocab()
    original = model.state_dict()
    for key, value in back.state_dict().items():
        if not key.startswith("language_model."):
            assert torch.equal(value, original[key]), key


def instructblip_lavis_state(model, projection: str, lm_prefix: str) -> dict:
    """The state dict LAVIS's blip2_t5_instruct / blip2_vicuna_instruct save: BERT names, the text side kept, no `cls`."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("language_projection."):
            state[projection + "." + key.split(".")[-1]] = value
        elif key.startswith("language_model.model."):
            state[lm_prefix + key[len("language_model.model."):]] = value
        else:
            state[lavis_key(key)] = value
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(model.config.qformer_config.max_position_embeddings)[None]
    return state


@pytest.mark.parametrize("lm, projection, lm_prefix", [("t5", "t5_proj", "t5_model."), ("opt", "llm_proj", "llm_model.")],
                         ids=["blip2_t5_instruct", "blip2_vicuna_instruct"])
def test_import_lavis_instructblip(data, tmp_path, lm, projection, lm_prefix):
    model, lm_tokenizer = instruct_model(data, lm, vision=TINY_EVA, seed=1)
    kind = "t5" if lm == "t5" else "decoder"
    model.language_model.model.save_pretrained(str(tmp_path / "lm"))
    lm_tokenizer.save_pretrained(str(tmp_path / "lm"))
    state = instructblip_lavis_state(model, projection, lm_prefix)
    words = state["Qformer.bert.embeddings.word_embeddings.weight"]
    assert words.shape == (len(model.instruction_tokenizer), 32)  # LAVIS resizes to the tokenizer with [DEC]
    assert {"Qformer.bert.encoder.layer.1.intermediate.dense.weight", "Qformer.bert.encoder.layer.1.output.LayerNorm.bias",
            "Qformer.bert.embeddings.position_embeddings.weight", f"{projection}.weight", "query_tokens"} <= set(state)
    assert not any(k.startswith("Qformer.cls.") for k in state)
    torch.save({"model": state}, tmp_path / "instruct.pth")
    with pytest.raises(ValueError, match="--bert"):
        import_lavis(tmp_path / "instruct.pth", tmp_path / "x", lm=str(tmp_path / "lm"), vision_config=TINY_EVA, num_attention_heads=2)
    notes = import_lavis(tmp_path / "instruct.pth", tmp_path / "out", stage=2, lm=str(tmp_path / "lm"), bert=str(data),
                         vision_config={**TINY_EVA, "ln_vision_eps": 1e-6}, num_attention_heads=2)
    assert any("InstructBLIP" in n for n in notes) and any(lm_prefix in n for n in notes)
    imported, _ = load_stage2(tmp_path / "out")
    assert imported.config.qformer_text_input and kind
    pixels = torch.randn(2, 3, 32, 32)
    qformer = instruction_tokens(imported.instruction_tokenizer, ["a short image caption :", "what color is the circle ?"])
    with torch.no_grad():
        torch.testing.assert_close(imported.soft_prompts(pixels, **qformer), model.soft_prompts(pixels, **qformer), atol=0, rtol=0)
