"""Import from LAVIS and transformers, export to transformers: round trips, outputs, LAVIS key names, bad input."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers

from qformer.bert import load_tokenizer
from qformer.config import LanguageModelConfig, preset
from qformer.folders import load_stage1, load_stage2, save_stage1, save_stage2
from qformer.generation import GenerationSettings, generate_text
from qformer.interop.hf import export_hf, import_hf
from qformer.interop.lavis import import_lavis, read_torch_checkpoint
from qformer.interop.names import lavis_key
from qformer.stage1 import Stage1Model
from qformer.stage2 import Stage2Model
from stages.data.synthetic import make_dataset

pytestmark = pytest.mark.parity
TINY_EVA = {"model_name": "eva_giant_patch14_clip_224", "image_size": 32, "precision": "fp32",
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 4.0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop_data")
    make_dataset(folder, num_images=8, seed=0)
    return folder


def tiny_stage1(data, eps=1e-6, vision=None):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data)
    config = preset("tiny")
    config.qformer_config.vocab_size = len(tokenizer)
    config.vision_config.ln_vision_eps = eps
    if vision:
        config.vision_config = type(config.vision_config)(**{**config.vision_config.__dict__, **vision, "ln_vision_eps": eps})
    model = Stage1Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not their init values
            p.add_(0.05 * torch.randn_like(p))
    return model, tokenizer


def stage1_outputs(model, pixels, ids, mask):
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        sim = model.itc_similarity(model.image_feats(model.query_forward(embeds).last_hidden_state), model.text_feat(ids, mask))
        return sim, model.itm_logits(embeds, ids, mask)


def text(tokenizer):
    tokens = tokenizer(["a small red circle", "a large blue square to the left of a small red circle"], padding=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


# --- ours <-> transformers, stage 1 --------------------------------------------------------------------------
def test_stage1_ours_to_hf_to_ours(data, tmp_path):
    model, tokenizer = tiny_stage1(data)
    save_stage1(model, tokenizer, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.Blip2Processor.from_pretrained(str(tmp_path / "hf"))
    assert processor.image_processor.size == {"height": 32, "width": 32}

    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text(tokenizer)
    sim, itm = stage1_outputs(model, pixels, ids, mask)
    with torch.no_grad():
        hf_sim = hf(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image
        hf_itm = hf(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm, hf_itm, atol=1e-5, rtol=1e-5)

    notes = import_hf(tmp_path / "hf", tmp_path / "back")
    assert any("temp" in n for n in notes) and any("lm_head" in n for n in notes)
    back, _ = load_stage1(tmp_path / "back")
    original = model.state_dict()
    for key, value in back.state_dict().items():
        if key != "temp" and not key.startswith("lm_head."):
            assert torch.equal(value, original[key]), key


def test_stage1_hf_to_ours_to_hf(data, tmp_path):
    model, tokenizer = tiny_stage1(data)
    save_stage1(model, tokenizer, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    export_hf(tmp_path / "imported", tmp_path / "hf_again")
    first = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).state_dict()
    second = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf_again")).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_export_notes_the_ln_vision_eps_transformers_cannot_hold(data, tmp_path):
    model, tokenizer = tiny_stage1(data, eps=1e-5)
    save_stage1(model, tokenizer, tmp_path / "ours")
    notes = export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).eval()
    used = hf.vision_model.post_layernorm.eps  # one layer_norm_eps for the whole vision tower
    assert any(f"will use eps {used}" in n and "instead of 1e-05" in n for n in notes), notes
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text(tokenizer)
    sim, _ = stage1_outputs(model, pixels, ids, mask)
    with torch.no_grad():
        hf_sim = hf(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image
    assert not torch.equal(sim, hf_sim)  # the difference the README states is real ...
    torch.testing.assert_close(sim, hf_sim, atol=1e-5, rtol=1e-5)  # ... and as small as the parity tolerance


def test_stage1_round_trip_through_transformers_gives_the_same_outputs(data, tmp_path):
    model, tokenizer = tiny_stage1(data, eps=1e-5)
    model.config.max_text_length = 24
    save_stage1(model, tokenizer, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    notes = import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tokenizer = load_stage1(tmp_path / "back")
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text(tokenizer)
    assert torch.equal(text(back_tokenizer)[0], ids)
    for ours, theirs in zip(stage1_outputs(model, pixels, ids, mask), stage1_outputs(back, pixels, ids, mask)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert back.config.vision_config.ln_vision_eps == 1e-5 and back.config.max_text_length == 24
    assert any("restores" in n for n in notes)


# --- ours <-> transformers, stage 2 --------------------------------------------------------------------------
LMS = {
    "opt": dict(model_type="opt", hidden_size=24, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=24,
                max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    "t5": dict(model_type="t5", d_model=24, d_ff=48, d_kv=12, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_stage2_ours_to_hf_to_ours(data, tmp_path, lm):
    kind = "t5" if lm == "t5" else "decoder"
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / f"lm_tokenizer_{kind}"), local_files_only=True)
    torch.manual_seed(0)
    config = preset("tiny")
    config.vision_config.ln_vision_eps = 1e-6
    config.language_model = LanguageModelConfig(config={**LMS[lm], "vocab_size": len(lm_tokenizer)}, precision="fp32",
                                                tokenizer=str(data / f"lm_tokenizer_{kind}"))
    model = Stage2Model(config).eval()
    with torch.no_grad():
        model.language_projection.weight.normal_(0, 0.5)
    save_stage2(model, lm_tokenizer, tmp_path / "ours")
    notes = export_hf(tmp_path / "ours", tmp_path / "hf")
    assert any("<image>" in n for n in notes)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.Blip2Processor.from_pretrained(str(tmp_path / "hf"))
    image_token = hf.config.image_token_index
    Q = config.num_query_tokens

    pixels = torch.randn(2, 3, 32, 32)
    prompt = lm_tokenizer(["a photo of", "a photo of"], return_tensors="pt")
    kwargs = dict(num_beams=2, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ours_ids = model.generate(pixels, prompt["input_ids"], prompt["attention_mask"], **kwargs)
        hf_ids = torch.cat([torch.full((2, Q), image_token), prompt["input_ids"]], 1)
        theirs = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **kwargs)
    if lm == "opt":
        theirs = theirs[:, hf_ids.shape[1]:]
    assert torch.equal(ours_ids, theirs)
    processed = processor(images=[torch.zeros(3, 32, 32)], text=["a photo of"], return_tensors="pt")
    assert (processed["input_ids"] == image_token).sum() == Q  # the processor inserts the query placeholders

    import_hf(tmp_path / "hf", tmp_path / "back")
    back, _ = load_stage2(tmp_path / "back")
    original = model.state_dict()
    for key, value in back.state_dict().items():
        if not key.startswith("language_model."):
            assert torch.equal(value, original[key]), key
    with torch.no_grad():
        assert torch.equal(back.generate(pixels, prompt["input_ids"], prompt["attention_mask"], **kwargs), ours_ids)


def test_stage2_round_trip_through_transformers_generates_the_same_captions(data, tmp_path):
    """export-hf then import hf, then what `qformer caption` runs: the generation settings come back too."""
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / "lm_tokenizer_decoder"), local_files_only=True)
    torch.manual_seed(0)
    config = preset("tiny")
    config.vision_config.ln_vision_eps = 1e-5
    config.language_model = LanguageModelConfig(config={**LMS["opt"], "vocab_size": len(lm_tokenizer)}, precision="fp32",
                                                tokenizer=str(data / "lm_tokenizer_decoder"), eos_text="</s>", max_text_length=24)
    model = Stage2Model(config).eval()
    with torch.no_grad():
        model.language_projection.weight.normal_(0, 0.5)
    save_stage2(model, lm_tokenizer, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back, back_tokenizer = load_stage2(tmp_path / "back")

    pixels = torch.randn(3, 3, 32, 32)
    settings = GenerationSettings(num_beams=2, max_new_tokens=6, min_new_tokens=2)
    before = generate_text(model, lm_tokenizer, pixels, ["a photo of"] * 3, settings)
    after = generate_text(back, back_tokenizer, pixels, ["a photo of"] * 3, settings)
    assert after == before and all(before), (before, after)
    assert (back.config.language_model.eos_text, back.config.language_model.max_text_length) == ("</s>", 24)
    with torch.no_grad():
        torch.testing.assert_close(back.soft_prompts(pixels), model.soft_prompts(pixels), atol=0, rtol=0)


def test_generation_when_the_eos_text_is_no_token(data):
    """A word-level tokenizer drops "\\n" (the default eos_text): generation stops at its eos token, and says so."""
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / "lm_tokenizer_decoder"), local_files_only=True)
    config = preset("tiny")
    config.language_model = LanguageModelConfig(config={**LMS["opt"], "vocab_size": len(lm_tokenizer)}, precision="fp32",
                                                tokenizer=str(data / "lm_tokenizer_decoder"))
    model = Stage2Model(config).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"eos_text '\\n' tokenises to nothing.*'</s>'"):
        assert len(generate_text(model, lm_tokenizer, pixels, ["a photo of"], GenerationSettings(num_beams=1, max_new_tokens=3))) == 1
    lm_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="language_model.eos_text"):
        generate_text(model, lm_tokenizer, pixels, ["a photo of"], GenerationSettings(num_beams=1, max_new_tokens=3))


# --- LAVIS ---------------------------------------------------------------------------------------------------
LAVIS_LAYER0 = {  # written from LAVIS's Qformer.py (BertLayer with cross-attention and the query FFN)
    "Qformer.bert.encoder.layer.0.attention.self.query.weight",
    "Qformer.bert.encoder.layer.0.attention.self.key.bias",
    "Qformer.bert.encoder.layer.0.attention.output.dense.weight",
    "Qformer.bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "Qformer.bert.encoder.layer.0.crossattention.self.value.weight",
    "Qformer.bert.encoder.layer.0.crossattention.output.dense.bias",
    "Qformer.bert.encoder.layer.0.crossattention.output.LayerNorm.bias",
    "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
    "Qformer.bert.encoder.layer.0.output.dense.weight",
    "Qformer.bert.encoder.layer.0.output.LayerNorm.weight",
    "Qformer.bert.encoder.layer.0.intermediate_query.dense.bias",
    "Qformer.bert.encoder.layer.0.output_query.dense.weight",
    "Qformer.bert.encoder.layer.0.output_query.LayerNorm.bias",
}
LAVIS_TOP = {  # Blip2Qformer's own modules and the EVA ViT (lavis/models/eva_vit.py)
    "query_tokens", "temp", "vision_proj.weight", "text_proj.bias", "itm_head.weight", "ln_vision.weight",
    "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.LayerNorm.weight", "Qformer.cls.predictions.bias",
    "Qformer.cls.predictions.transform.dense.weight", "Qformer.cls.predictions.transform.LayerNorm.bias",
    "visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
    "visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.blocks.0.attn.q_bias", "visual_encoder.blocks.0.attn.v_bias",
    "visual_encoder.blocks.0.attn.proj.weight", "visual_encoder.blocks.1.mlp.fc2.bias", "visual_encoder.blocks.1.norm2.weight",
}


def lavis_state(model) -> dict:
    state = {lavis_key(k): v for k, v in model.state_dict().items()}
    words = model.qformer.embeddings.word_embeddings.weight if hasattr(model.qformer.embeddings, "word_embeddings") else None
    if words is not None:  # what LAVIS's checkpoints carry besides: the tied decoder and a buffer
        state["Qformer.cls.predictions.decoder.weight"] = words.detach().clone()
        state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"].clone()
        state["Qformer.bert.embeddings.position_ids"] = torch.arange(model.config.qformer_config.max_position_embeddings)[None]
    return state


def test_lavis_key_names(data):
    model, _ = tiny_stage1(data, vision=TINY_EVA)
    names = set(lavis_state(model))
    assert LAVIS_LAYER0 <= names and LAVIS_TOP <= names
    assert not any("crossattention" in k for k in names if ".layer.1." in k)  # cross-attention every 2nd layer


def test_import_lavis_stage1_gives_the_same_outputs(data, tmp_path):
    model, tokenizer = tiny_stage1(data, eps=1e-5, vision=TINY_EVA)
    torch.save({"model": lavis_state(model)}, tmp_path / "blip2.pth")
    notes = import_lavis(tmp_path / "blip2.pth", tmp_path / "out", stage=1, bert=str(data),
                         vision_config={**TINY_EVA, "ln_vision_eps": 1e-5}, num_attention_heads=2)
    assert any("decoder.weight" in n for n in notes) and any("position_ids" in n for n in notes)
    imported, _ = load_stage1(tmp_path / "out")
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text(tokenizer)
    for ours, theirs in zip(stage1_outputs(model, pixels, ids, mask), stage1_outputs(imported, pixels, ids, mask)):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    with torch.no_grad():
        decoder = ids.clone()
        decoder[:, 0] = tokenizer.bos_token_id
        query = model.query_forward(model.encode_image(pixels))
        query_imported = imported.query_forward(imported.encode_image(pixels))
        torch.testing.assert_close(model.itg_logits(decoder, mask, query.query_kv), imported.itg_logits(decoder, mask, query_imported.query_kv))


def test_import_lavis_opt_stage2(data, tmp_path):
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / "lm_tokenizer_decoder"), local_files_only=True)
    lm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**LMS["opt"], vocab_size=len(lm_tokenizer)))
    lm.save_pretrained(str(tmp_path / "opt"))
    lm_tokenizer.save_pretrained(str(tmp_path / "opt"))
    config = preset("tiny")
    config.vision_config = type(config.vision_config)(**TINY_EVA)
    config.language_model = LanguageModelConfig(path=str(tmp_path / "opt"), precision="fp32")
    torch.manual_seed(1)
    model = Stage2Model(config).eval()
    state = {("opt_proj." + k[len("language_projection."):] if k.startswith("language_projection.") else
              "opt_model." + k[len("language_model.model."):] if k.startswith("language_model.") else lavis_key(k)): v
             for k, v in model.state_dict().items()}
    assert "opt_proj.weight" in state and "Qformer.bert.encoder.layer.0.output_query.dense.weight" in state
    assert not any(".output.dense." in k and "layer" in k and "attention" not in k for k in state)  # no text FFN in stage 2
    torch.save({"model": state}, tmp_path / "blip2_opt.pth")
    import_lavis(tmp_path / "blip2_opt.pth", tmp_path / "out", stage=2, lm=str(tmp_path / "opt"), vision_config=TINY_EVA, num_attention_heads=2)
    imported, _ = load_stage2(tmp_path / "out")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(imported.soft_prompts(pixels), model.soft_prompts(pixels), atol=0, rtol=0)


def lavis_eva_forward(state: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """A transcription of LAVIS's EVA VisionTransformer.forward_features (eva_vit.py), for a tiny config."""
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], 1) + state["pos_embed"]
    for i in range(depth):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, x.shape[-1:], p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        B, N, C = h.shape
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, -1), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, x.shape[-1:], p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return x


def test_eva_blocks_match_lavis_in_timm(tmp_path):
    torch.manual_seed(0)
    eva = timm.create_model("eva_giant_patch14_clip_224", num_classes=0, img_size=32, **TINY_EVA["model_kwargs"]).eval()
    with torch.no_grad():
        for name, p in eva.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.1)  # LAVIS's q/v biases are separate parameters; make them count
    state = {k: v for k, v in eva.state_dict().items() if not k.startswith(("norm.", "head", "fc_norm"))}
    torch.save(state, tmp_path / "eva.pth")
    x = torch.randn(2, 3, 32, 32)
    eva.prune_intermediate_layers(indices=[2], prune_norm=True)  # all 3 blocks, no final norm: LAVIS's output
    with torch.no_grad():
        reference = lavis_eva_forward(state, x, depth=3, heads=2)
        timm_out = eva.forward_features(x)
    assert timm_out.shape == reference.shape == (2, 17, 32)
    torch.testing.assert_close(timm_out, reference, atol=1e-5, rtol=1e-5)

    # and our encoder built from LAVIS-named weights (as in eva_vit_g.pth) computes the same, minus the last block
    from qformer.config import VisionConfig
    from qformer.vision import FrozenImageEncoder

    encoder = FrozenImageEncoder(VisionConfig(**{**TINY_EVA, "weights_path": str(tmp_path / "eva.pth")}))
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), lavis_eva_forward(state, x, depth=2, heads=2), atol=1e-5, rtol=1e-5)


# --- bad input -----------------------------------------------------------------------------------------------
def test_bad_checkpoints_fail_clearly(data, tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="not a BLIP-2 checkpoint"):
        import_lavis(other, tmp_path / "out", bert=str(data))
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 4)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read .*truncated.pth"):
        read_torch_checkpoint(truncated)
    unexpected = tmp_path / "pickle.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "extra": Path("/etc")}, unexpected)
    with pytest.raises(ValueError, match="weights-only"):
        read_torch_checkpoint(unexpected)
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="BertModel"):
        import_hf(tmp_path / "hf", tmp_path / "x")
