"""`qformer serve` in a real browser: Chromium, driven by playwright, captions an upload and searches an index on a
page served on a free local port by tiny models. Every request the page makes outside that server is blocked and
counted: the page must need nothing from the internet.

Needs the web extra (gradio, playwright) and Debian's chromium (`.ci/run` installs both); skipped, saying which is
missing, where they are not.
"""

import importlib.util
import os
import shutil
import socket

import pytest

from stages.cli import main
from stages.data.synthetic import make_dataset

from tiny_models import write_stage1, write_stage2

CHROMIUM = os.environ.get("QFORMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("QFORMER_SCREENSHOT")  # also keep the page's picture there
INDEXED = 20
RESULTS = 12

needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason='gradio is not installed (pip install -e ".[web]")')
needs_browser = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or CHROMIUM is None,
    reason='needs playwright (pip install -e ".[web]") and Chromium (apt-get install chromium; or set QFORMER_CHROMIUM)')


@pytest.fixture(scope="module")
def page_models(tmp_path_factory):
    """Both tiny models and an index of 20 images, loaded as `qformer serve` loads them (no gradio needed)."""
    from stages.apps.serve import load_models

    root = tmp_path_factory.mktemp("serve")
    make_dataset(root / "data", num_images=INDEXED, seed=4)
    stage1, stage2 = write_stage1(root / "data", root / "stage1"), write_stage2(root / "data", root / "stage2")
    assert main(["index", "--model", str(stage1), str(root / "data" / "images"), "--out", str(root / "index"), "--no-progress"]) == 0
    return load_models(None, str(stage2), str(root / "index")), root  # stage 1: the model the index was built with


@pytest.fixture(scope="module")
def served(page_models):
    """The page on a free port of 127.0.0.1; closed afterwards."""
    from stages.apps.serve import build_app, import_gradio, launch, upload_folder

    import_gradio()
    models, root = page_models
    with upload_folder():  # as `qformer serve` runs it: uploads in a folder of this server's own
        app = build_app(models)
        launch(app, "127.0.0.1", free_port(), block=False)
        yield app.local_url, models, root
        app.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_what_each_tab_does(page_models, tmp_path):
    from stages.apps.serve import answer_question, caption_image, match_image_text, search_images

    from broken_files import write_broken_images

    models, root = page_models
    image = str(root / "data" / "images" / "000001.png")
    assert caption_image(models, image, num_beams=2, max_new_tokens=5) and answer_question(models, image, "what color is it?")
    assert caption_image(models, image, sample=True, top_p=0.5, max_new_tokens=5)
    scores = match_image_text(models, image, "a small red circle")
    assert "ITM match probability" in scores and "ITC similarity" in scores
    assert len(search_images(models, "a small red circle", k=7, rerank=3)) == 7
    broken = write_broken_images(tmp_path)
    for function, extra in ((caption_image, ()), (answer_question, ("what?",)), (match_image_text, ("a circle",))):
        with pytest.raises(ValueError, match="cannot read the image: .*empty file"):
            function(models, str(broken["empty"]), *extra)
    with pytest.raises(ValueError, match="upload an image"):
        caption_image(models, None)
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        caption_image(models, image, num_beams=0)


@needs_gradio
def test_tabs_without_their_model_say_what_is_missing():
    from stages.apps.serve import Models, build_app, import_gradio

    import_gradio()
    page = str(build_app(Models()).config)
    for missing in ("A stage-2 model is not loaded", "An index is not loaded", "A stage-1 model is not loaded"):
        assert missing in page
    assert main(["serve"]) == 2  # nothing to serve: one line, no server


@needs_gradio
@needs_browser
def test_the_page_captions_an_upload_and_searches_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    from stages.apps.serve import caption_image

    url, models, root = served
    image = root / "data" / "images" / "000003.png"
    outside = []

    def local_only(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)  # every wait is bounded
            page.route("**/*", local_only)
            page.goto(url)

            page.get_by_role("tab", name="Caption").click()
            page.locator("#caption-image input[type=file]").set_input_files(str(image))
            page.locator("#caption-image img").wait_for()  # uploaded and shown: only then is it the button's input
            page.click("#caption-button")
            page.wait_for_function("document.querySelector('#caption-output textarea').value.length > 0")
            shown_caption = page.input_value("#caption-output textarea")

            page.get_by_role("tab", name="Search").click()
            page.fill("#search-text textarea", "a large red circle")
            page.click("#search-button")
            page.wait_for_function(f"[...document.querySelectorAll('#search-gallery img')]"
                                   f".filter(img => img.complete && img.naturalWidth > 0).length >= {RESULTS}")  # shown, not only listed
            gallery_items = page.locator("#search-gallery img").count()
            labels = page.locator("#search-gallery").inner_text()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    if SCREENSHOT:
        shutil.copy(tmp_path / "page.png", SCREENSHOT)

    assert shown_caption == caption_image(models, str(image))  # the page shows what the model generates
    assert gallery_items == RESULTS  # the default number of results, from an index of more
    assert "1. " in labels and f"{RESULTS}. " in labels  # ranks and scores under the pictures
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert outside == []  # nothing fetched from anywhere but the page's own server
