"""A page to try both models on one's own pictures: `qformer serve` (gradio, the optional `[web]` extra).

One `gr.Blocks` page with four tabs: Caption and Ask (stage 2), Search (stage 1 + an index from `qformer index`)
and Match (stage 1). The models are loaded once, when the command starts; requests queue and run one at a time.
What a tab does is a plain function of `Models` (testable without gradio); the page only wires them to widgets and
turns a user's mistake (an unreadable upload, a wrong setting) into a message on the page.

gradio is imported inside the functions that need it, so the core install does not need it, and with analytics
off: the page and the server reach nothing beyond the machine they run on (the theme uses the system's fonts).
The page reads only files uploaded to it, kept in a folder of the run's own and removed when it stops (web_guards).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

from qformer.generation import (
    CAPTION_GENERATION,
    CAPTION_PROMPT,
    VQA_GENERATION,
    GenerationSettings,
    check_max_new_tokens,
    max_new_tokens_for,
)
from stages.apps.image_index import ImageIndex, model_identity, tokenize
from stages.apps.search import hit_label, thumbnail
from stages.apps.web_guards import capped_uploads, check_port, exposure_warning, upload_folder, uploaded_image
from stages.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReader, SkippedImages, UnreadableImage

MAX_UPLOAD = "25mb"  # one file
QUEUE_SIZE = 16  # requests waiting beyond this are turned away instead of piling up
WEB_EXTRA = 'pip install -e ".[web]"'
NO_TEXT = "(no text: the model ended at once)"
UNLIMITED_SLIDER = 256  # the max-new-tokens slider's end for an LM without a position limit (T5)


@dataclass
class Models:
    """What the page serves, loaded once; any part may be None (its tabs say what is missing)."""

    stage1: tuple | None = None  # (Stage1Model, BERT tokenizer)
    stage2: tuple | None = None  # (Stage2Model, LM tokenizer)
    index: ImageIndex | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def reader(self) -> ImageReader:
        """A reader that keeps the reasons instead of printing them: the page shows them."""
        return ImageReader(self.max_image_pixels, skipped=SkippedImages(report=lambda line: None))


def load_models(stage1: str | None, stage2: str | None, index: str | None, device: str = "cpu",
                max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Models:
    """Load what was given; an index without --stage1 uses the stage-1 export it was built with."""
    from qformer.folders import load_stage1, load_stage2
    from stages.distributed import device_for

    torch_device = device_for(device, 0)
    image_index = ImageIndex(index) if index else None
    stage1 = stage1 or (image_index.built_with() if image_index else None)
    models = Models(max_image_pixels=max_image_pixels, index=image_index)
    if stage1:
        model, tokenizer = load_stage1(stage1)
        if image_index:
            image_index.check_model(model_identity(model, stage1), "--index")
        models.stage1 = (model.to(torch_device), tokenizer)
    if stage2:
        model, tokenizer = load_stage2(stage2)
        models.stage2 = (model.to(torch_device), tokenizer)
    return models


# --- what each tab does -----------------------------------------------------------------------------------------
def _unreadable(reader: ImageReader, image: str) -> ValueError:
    return ValueError(f"cannot read the image: {reader.skipped.reasons[str(image)]}")


def _generate(models: Models, image: str | None, prompt: str, settings: GenerationSettings, prompt_name: str = "prompt") -> str:
    from stages.apps.generate import generate_for_images

    if not image:
        raise ValueError("upload an image first")
    model, tokenizer = models.stage2
    check_max_new_tokens(model, tokenizer, [prompt], settings.max_new_tokens, setting="max new tokens", prompt_name=prompt_name)
    reader = models.reader()
    [texts] = generate_for_images(model, tokenizer, [image], [[prompt]], reader, settings, batch_size=1)
    if texts is None:
        raise _unreadable(reader, image)
    return texts[0] or NO_TEXT  # an empty box would look like a request that never ran


def caption_image(models: Models, image: str | None, prompt: str = CAPTION_PROMPT, num_beams: int = CAPTION_GENERATION.num_beams,
                  max_new_tokens: int = CAPTION_GENERATION.max_new_tokens, sample: bool = False, top_p: float = 0.9,
                  temperature: float = 1.0) -> str:
    """One caption: beam search, or nucleus sampling (`sample`) with `top_p` and `temperature`."""
    settings = GenerationSettings(num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                                  min_new_tokens=min(CAPTION_GENERATION.min_new_tokens, int(max_new_tokens)),
                                  top_p=float(top_p) if sample else None, temperature=float(temperature))
    return _generate(models, image, prompt, settings)


def max_new_tokens_slider_end(models: Models) -> int:
    """The slider's end: the most new tokens the LM's positions leave beside the default prompt (the CLI's limit)."""
    model, tokenizer = models.stage2
    room = max_new_tokens_for(model, tokenizer, [CAPTION_PROMPT])
    return UNLIMITED_SLIDER if room is None else room


def answer_question(models: Models, image: str | None, question: str) -> str:
    """A zero-shot answer, with the paper's prompt for the LM's family."""
    from qformer.generation import vqa_prompt

    if not question.strip():
        raise ValueError("type a question")
    return _generate(models, image, vqa_prompt(*models.stage2).format(question.strip()), VQA_GENERATION, "question")


def search_images(models: Models, text: str, k: int = 12, rerank: int = 0) -> list[tuple]:
    """(thumbnail, "rank. score  name") per result, best first; an image unreadable now is left out."""
    if not text.strip():
        raise ValueError("type what to look for")
    model, tokenizer = models.stage1
    reader = models.reader()
    hits = models.index.search(model, tokenizer, text, int(k), int(rerank), reader)
    shown = [(thumbnail(hit.path, 256, reader), hit_label(hit)) for hit in hits]
    return [(image, label) for image, label in shown if image is not None]


def match_image_text(models: Models, image: str | None, text: str) -> str:
    """ITM match probability and ITC similarity of one image and one text."""
    from qformer.retrieval import image_features, match_scores
    from qformer.transforms import eval_transform

    if not image or not text.strip():
        raise ValueError("upload an image and type a text")
    model, tokenizer = models.stage1
    reader = models.reader()
    pixels, _ = reader.load([image], eval_transform(model.config.vision_config.image_size))
    if pixels is None:
        raise _unreadable(reader, image)
    input_ids, attention_mask = tokenize(model, tokenizer, text)
    image_embeds, image_feats = image_features(model, pixels.to(input_ids.device))
    logits, itc = match_scores(model, image_embeds, image_feats, input_ids, attention_mask)
    return f"ITM match probability **{float(logits.softmax(-1)[0, 1]):.3f}** · ITC similarity **{float(itc[0]):.3f}**"


# --- the page ---------------------------------------------------------------------------------------------------
def _shown_to_user(function):
    """A user's mistake becomes a message on the page (gr.Error), not a server traceback."""
    import gradio as gr

    @functools.wraps(function)
    def wrapped(*args):
        try:
            return function(*args)
        except (ValueError, UnreadableImage) as error:
            raise gr.Error(str(error).splitlines()[0], print_exception=False) from None  # no traceback in the log either

    return wrapped


def _missing(what: str, option: str) -> None:
    import gradio as gr

    gr.Markdown(f"**{what} is not loaded.** Start the page with `qformer serve {option}` to use this tab.")


def build_app(models: Models):
    """The page: four tabs, each wired to its function above."""
    import gradio as gr

    def bound(function):
        return _shown_to_user(functools.partial(function, models))

    with gr.Blocks(title="qformer", analytics_enabled=False) as app:
        gr.Markdown("# qformer — BLIP-2 Q-Former\nCaption and question your images (stage 2), search a folder and match "
                    "images with texts (stage 1).")
        with gr.Tabs():
            with gr.Tab("Caption"):
                if models.stage2 is None:
                    _missing("A stage-2 model", "--stage2 DIR")
                else:
                    with gr.Row():
                        image = uploaded_image(elem_id="caption-image")
                        with gr.Column():
                            prompt = gr.Textbox(CAPTION_PROMPT, label="prompt")
                            beams = gr.Slider(1, 10, CAPTION_GENERATION.num_beams, step=1, label="beams")
                            end = max_new_tokens_slider_end(models)  # what the CLI allows with the default prompt
                            max_tokens = gr.Slider(1, end, min(CAPTION_GENERATION.max_new_tokens, end), step=1,
                                                   label="max new tokens")
                            sample = gr.Checkbox(False, label="nucleus sampling instead of beam search")
                            top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="top p")
                            temperature = gr.Slider(0.1, 2.0, 1.0, step=0.1, label="temperature")
                    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    caption = gr.Textbox(label="caption", elem_id="caption-output")
                    button.click(bound(caption_image), [image, prompt, beams, max_tokens, sample, top_p, temperature], caption,
                                 api_name="caption")
            with gr.Tab("Ask"):
                if models.stage2 is None:
                    _missing("A stage-2 model", "--stage2 DIR")
                else:
                    with gr.Row():
                        image = uploaded_image()
                        with gr.Column():
                            question = gr.Textbox(label="question", placeholder="what color is the circle?")
                            button = gr.Button("Ask", variant="primary")
                            answer = gr.Textbox(label="answer")
                    button.click(bound(answer_question), [image, question], answer, api_name="ask")
                    question.submit(bound(answer_question), [image, question], answer, api_name=False)
            with gr.Tab("Search"):
                if models.index is None:
                    _missing("An index", "--index INDEX (made with qformer index)")
                else:
                    gr.Markdown(f"{len(models.index.images)} images in `{models.index.folder}`")
                    with gr.Row():
                        query = gr.Textbox(label="text", placeholder="a large red circle", scale=3, elem_id="search-text")
                        k = gr.Slider(1, 48, 12, step=1, label="results", scale=1)
                        rerank = gr.Slider(0, 48, 0, step=1, label="ITM re-rank of the top K (0: off)", scale=1)
                    button = gr.Button("Search", variant="primary", elem_id="search-button")
                    gallery = gr.Gallery(label="results (score, file)", columns=6, object_fit="contain", elem_id="search-gallery")
                    button.click(bound(search_images), [query, k, rerank], gallery, api_name="search")
                    query.submit(bound(search_images), [query, k, rerank], gallery, api_name=False)
            with gr.Tab("Match"):
                if models.stage1 is None:
                    _missing("A stage-1 model", "--stage1 DIR")
                else:
                    with gr.Row():
                        image = uploaded_image()
                        with gr.Column():
                            text = gr.Textbox(label="text", placeholder="a small blue square")
                            button = gr.Button("Match", variant="primary")
                            scores = gr.Markdown()
                    button.click(bound(match_image_text), [image, text], scores, api_name="match")
    return app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def theme():
    """gradio's default look with the system's fonts: the default theme would fetch its fonts from the internet."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(app, host: str, port: int, block: bool = True):
    """Start the server: local only unless `host` says otherwise, no share link, no server-side rendering (Node)."""
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, mcp_server=False,
                      pwa=False, max_file_size=MAX_UPLOAD, theme=theme(), prevent_thread_lock=not block, quiet=True,
                      app_kwargs={"middleware": [capped_uploads()]})


def import_gradio() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no usage reports sent
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError(f"qformer serve needs gradio, which the core install leaves out: {WEB_EXTRA}") from None


def serve(
    *,
    stage1: str | None = None,
    stage2: str | None = None,
    index: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> int:
    """A web page to try the models on your own images: Caption, Ask, Search and Match tabs (gradio).

    Needs the web extra: pip install -e ".[web]". Either model may be left out; the tabs that need it say so.

    Args:
        stage1: a stage-1 export folder (Match and Search tabs).
        stage2: a stage-2 export folder (Caption and Ask tabs).
        index: an index made by qformer index (Search tab); without --stage1, the model it was built with is used.
        host: address to listen on; 127.0.0.1 keeps the page on this machine (0.0.0.0: every network interface,
            with a warning: the page has no login).
        port: port to listen on.
        device: cpu, cuda or cuda:N.
        max_image_pixels: refuse images whose header declares more pixels, before decoding.
    """
    if not (stage1 or stage2 or index):
        raise ValueError("give at least one of --stage1 DIR, --stage2 DIR, --index INDEX")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {port}")
    check_port(host, port)
    import_gradio()
    models = load_models(stage1, stage2, index, device, max_image_pixels)
    with upload_folder():  # removed when the server stops: Ctrl+C, SIGTERM or an error
        app = build_app(models)
        print(f"qformer serve: http://{host}:{port} (Ctrl+C stops it)", file=sys.stderr)
        if exposure_warning(host):
            print(exposure_warning(host), file=sys.stderr)
        launch(app, host, port)
    return 0
