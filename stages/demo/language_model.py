"""The stand-in for a pretrained LLM: a small OPT or T5 trained here on the training captions' text, then frozen.

No pretrained LLM can be had offline, so the demo trains one on what a pretrained LLM would know (the captions,
and questions about the objects with their answers), after a context that stage 2 later fills with the soft
visual prompts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from qformer.generation import CAPTION_PROMPT
from stages.data.synthetic import questions_for
from stages.data.synthetic_tasks import HELDOUT_TEMPLATES, TEMPLATES, task_questions
from stages.demo.settings import DemoSettings, lm_config
from stages.train.optim import warmup_cosine


def context_embeddings(model, tokenizer, objects_batch: list[list[dict]], slots: int, noise: float) -> torch.Tensor:
    """The pre-training context, (B, slots, H): slot i holds the i-th object from the left as the sum of its
    size, colour and shape word embeddings; the other slots hold the padding embedding."""
    embed = model.get_input_embeddings()
    pad = embed(torch.tensor(tokenizer.pad_token_id))
    rows = []
    for objects in objects_batch:
        row = [embed(torch.tensor(tokenizer.convert_tokens_to_ids([o["size"], o["color"], o["shape"]]))).sum(0) for o in objects]
        rows.append(torch.stack(row + [pad] * (slots - len(row))))
    context = torch.stack(rows)
    return context + noise * context.detach().std() * torch.randn_like(context)


def pretraining_text(sample: dict, rng: random.Random, encoder_decoder: bool) -> tuple[str, str]:
    """(prefix, text) for one pre-training sample: its caption, or a question about its objects and the answer.

    Decoder-only LMs learn the whole `prefix + text`; encoder-decoder LMs read the prefix and learn the text.
    """
    from qformer.generation import VQA_PROMPTS

    if rng.random() < 0.25:
        question, answer = rng.choice(questions_for(sample["objects"]))
        prompt = VQA_PROMPTS["instruction_tuned" if encoder_decoder else "plain"].format(question)
        return (prompt, answer) if encoder_decoder else (f"{prompt} ", answer)
    if encoder_decoder:
        return CAPTION_PROMPT, sample["caption"]
    return (f"{CAPTION_PROMPT} " if rng.random() < 0.5 else ""), sample["caption"]


# The phrasings the stand-in LM's text pre-training knows: every template, the held-out ones too. They stand for the
# language a real LLM (FlanT5, Vicuna) knows from its own text pre-training; stage 2, the image-grounded instruction
# tuning, still trains on TEMPLATES alone, and the evaluation asks with HELDOUT_TEMPLATES.
LANGUAGE_TEMPLATES = {task: TEMPLATES[task] + HELDOUT_TEMPLATES[task] for task in TEMPLATES}


def instruction_pretraining_text(sample: dict, rng: random.Random, encoder_decoder: bool) -> tuple[str, str]:
    """`demo --instruct`'s (prefix, text): half captions, half questions of any task, each after one of every template
    (`LANGUAGE_TEMPLATES`, the language a real LLM would know); decoder-only LMs get a space between the two."""
    questions = [pair for pairs in task_questions(sample["objects"]).values() for pair in pairs]
    if rng.random() < 0.5:
        prefix, text = _template(LANGUAGE_TEMPLATES["caption"], rng), sample["caption"]
    else:
        question, text = rng.choice(questions)
        prefix = _template(LANGUAGE_TEMPLATES["vqa"], rng).replace("{}", question)
    return (prefix, text) if encoder_decoder else (prefix + " ", text)


def _template(templates: list[str], rng: random.Random) -> str:
    return rng.choice(templates).replace("<Image>", "").strip()


def pretrain_language_model(settings: DemoSettings, data: Path, out: Path, slots: int) -> Path:
    """Train the small LM on caption text (what a pretrained LLM would know), save it as a local folder.

    Each text follows a context of `slots` embeddings describing its objects, so that, like a real LLM,
    the stand-in learns to use information given in its context; stage 2 then puts the soft visual prompts
    in that place. A quarter of the texts are questions about the objects with their answers, in the
    paper's VQA prompt format, so that the frozen LM can answer questions about an image zero-shot: stage 2
    itself only ever sees captions.
    """
    import transformers

    from qformer.lm_text import IGNORE, decoder_only_batch, encoder_decoder_batch

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    kind = "t5" if settings.encoder_decoder else "decoder"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / f"lm_tokenizer_{kind}"), local_files_only=True)
    config = transformers.AutoConfig.for_model(**lm_config(settings, len(tokenizer)))
    auto = transformers.AutoModelForSeq2SeqLM if settings.encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    samples = json.loads((data / "train.json").read_text())
    text_of = instruction_pretraining_text if settings.instruct else pretraining_text
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, settings.lm_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, settings.lm_steps, 0.03))
    losses = []
    model.train()
    for _ in tqdm(range(settings.lm_steps), desc="LM pre-training on captions and questions", file=sys.stderr):
        batch_samples = rng.sample(samples, 64)
        prefixes, texts = zip(*(text_of(s, rng, settings.encoder_decoder) for s in batch_samples))
        context = context_embeddings(model, tokenizer, [s["objects"] for s in batch_samples], slots, noise=0.3)
        ones = torch.ones(len(texts), slots, dtype=torch.long)
        if settings.encoder_decoder:
            batch = encoder_decoder_batch(tokenizer, list(prefixes), list(texts), 32)
            embeds = torch.cat([context, model.get_input_embeddings()(batch.input_ids)], 1)
            loss = model(inputs_embeds=embeds, attention_mask=torch.cat([ones, batch.attention_mask], 1), labels=batch.labels,
                         decoder_attention_mask=batch.decoder_attention_mask).loss
        else:
            batch = decoder_only_batch(tokenizer, [p + t for p, t in zip(prefixes, texts)], eos_text="</s>", max_length=32)
            embeds = torch.cat([context, model.get_input_embeddings()(batch.input_ids)], 1)
            labels = torch.cat([torch.full((len(texts), slots), IGNORE), batch.labels], 1)
            loss = model(inputs_embeds=embeds, attention_mask=torch.cat([ones, batch.attention_mask], 1), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    folder = out / f"lm_{'t5' if settings.encoder_decoder else 'opt'}"  # with smollm2: its stand-in, the transfer source
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "pretraining_losses.json").write_text(json.dumps(losses))
    return folder
