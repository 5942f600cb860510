"""Evaluation metrics as the paper reports them: retrieval recall, captioning scores, VQAv2 accuracy."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys

import torch
from torch import Tensor

# --- retrieval ---------------------------------------------------------------------------------------


def retrieval_recalls(score_i2t: Tensor, score_t2i: Tensor, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """Recall@1/5/10 both ways in percent, as LAVIS's `_report_metrics`.

    Text retrieval (i2t) counts a hit when any of the image's captions is in the top K; image retrieval (t2i)
    uses the caption's one image. Ties count against the model (a positive ranks after every other entry with
    the same score), so a positive left at -100 outside the re-ranked top-k is never a hit. A non-finite
    score (NaN, infinity) is never a hit: such a positive ranks last, and a NaN elsewhere ranks first.
    """
    def best_rank(scores: Tensor, positives: list[int]) -> float:
        finite = [j for j in positives if torch.isfinite(scores[j])]
        if not finite:
            return float("inf")
        best = max(finite, key=lambda j: scores[j].item())
        return float((scores.isnan() | (scores >= scores[best])).sum()) - 1

    i2t_ranks = torch.tensor([best_rank(score_i2t[i], img2txt[i]) for i in range(len(img2txt))])
    t2i_ranks = torch.tensor([best_rank(score_t2i[t], [txt2img[t]]) for t in range(len(txt2img))])
    result = {}
    for name, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        for k in (1, 5, 10):
            result[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        result[f"{name}_r_mean"] = sum(result[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


# --- captioning -------------------------------------------------------------------------------------
# The PTB tokenizer's punctuation list (pycocoevalcap/tokenizer/ptbtokenizer.py), for the Java-free tokenizer.
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    return subprocess.run([java, "-version"], capture_output=True).returncode == 0


@contextlib.contextmanager
def _silent_stderr():
    """Send file descriptor 2 (what subprocesses write to) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def simple_tokenize(text: str) -> str:
    """Lowercase, split punctuation off, drop the PTB tokenizer's punctuation tokens."""
    tokens = re.findall(r"[\w]+(?:'[\w]+)?|[^\w\s]", text.lower())
    return " ".join(t for t in tokens if t not in _PUNCTUATION)


def tokenize_captions(captions: dict, tokenizer: str) -> dict:
    """{id: [text, ...]} -> {id: [tokenized text, ...]} with the PTB tokenizer (Java) or the Python one."""
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _silent_stderr():  # the Java tokenizer reports its speed on the terminal's stderr
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def caption_metrics(predictions: dict, references: dict, tokenizer: str = "auto", meteor: str = "auto") -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4, CIDEr and ROUGE-L (pycocoevalcap's pure-Python scorers), METEOR when Java runs.

    predictions: {image id: caption}; references: {image id: [caption, ...]}. Returns (scores x 100 as
    LAVIS prints them, notices). SPICE is not computed: it needs Stanford CoreNLP downloaded at first use.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    notices = ["SPICE skipped: it downloads Stanford CoreNLP on first use"]
    missing = sorted(set(predictions) - set(references), key=str)
    if missing:
        raise ValueError(f"predictions for images without references: {missing[:5]}")
    has_java = java_available()
    if tokenizer == "auto":
        tokenizer = "ptb" if has_java else "python"
        if not has_java:
            notices.append("Java not found: captions tokenized in Python (PTB punctuation rules), METEOR skipped")
    ids = list(predictions)
    refs = tokenize_captions({i: references[i] for i in ids}, tokenizer)
    preds = tokenize_captions({i: [predictions[i]] for i in ids}, tokenizer)
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its length ratio
        bleu, _ = Bleu(4).compute_score(refs, preds)
    for n, value in enumerate(bleu, start=1):
        scores[f"bleu{n}"] = 100 * value
    scores["cider"] = 100 * Cider().compute_score(refs, preds)[0]
    scores["rouge_l"] = 100 * Rouge().compute_score(refs, preds)[0]
    if (meteor == "auto" and has_java) or meteor == "on":
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scores["meteor"] = 100 * Meteor().compute_score(refs, preds)[0]
        except Exception as error:  # the Java subprocess can fail in many ways; the other scores still stand
            notices.append(f"METEOR skipped: {error}")
    return scores, notices


# --- VQAv2 ------------------------------------------------------------------------------------------
# Answer normalisation of the official VQA evaluation (vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered":
    "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve":
    "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys":
    "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've":
    "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def normalize_answer(answer: str) -> str:
    """The official VQA answer processing: punctuation, then digits, articles and contractions."""
    original = answer
    text = answer
    for p in _PUNCT:  # the official code tests the unprocessed answer and edits the processed one
        if (p + " " in original or " " + p in original) or re.search(_COMMA_STRIP, original) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text, re.UNICODE)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#humans that said it / 3, 1), averaged over the 10 leave-one-annotator-out subsets.

    As the official evaluator: whitespace is always cleaned, the full normalisation applies only when the
    human answers disagree.
    """
    clean = lambda a: a.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    prediction, answers = clean(prediction), [clean(a) for a in answers]
    if len(set(answers)) > 1:
        prediction = normalize_answer(prediction)
        answers = [normalize_answer(a) for a in answers]
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)
