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
from pathlib import Path

import pytest

from stages.cli import main
from stages.data.synthetic import make_dataset

from tiny_models import write_stage1, write_stage2

CHROMIUM = os.environ.get("QFORMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("QFORMER_SCREENSHOT")  # also keep the page's picture there
INDEXED = 20
RESULTS = 12
CAPTION = ("a photo of", 1, 5, False, 0.9, 1.0)  # the Caption tab's settings after the image: prompt, beams, max new tokens, ...

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
    from stages.apps.serve import build_app, import_gradio, launch
    from stages.apps.web_guards import upload_folder

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

            (tmp_path / "notes.png").write_text("not an image\n")  # a broken upload: the reader's reason, on the page
            page.locator("#caption-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
            page.click("#caption-button")
            refusal = page.get_by_text("cannot read the image:").first
            refusal.wait_for()
            shown_refusal = refusal.inner_text()

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
    assert shown_refusal == "cannot read the image: cannot identify image file"
    assert gallery_items == RESULTS  # the default number of results, from an index of more
    assert "1. " in labels and f"{RESULTS}. " in labels  # ranks and scores under the pictures
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert outside == []  # nothing fetched from anywhere but the page's own server


# --- what a browser (or a script) can send that the page does not expect ---------------------------------------
@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


@needs_gradio
def test_a_broken_upload_shows_the_readers_reason(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from broken_files import write_broken_images

    broken = write_broken_images(tmp_path)
    tried = [("text", "cannot identify image file", api_name, after)
             for api_name, after in (("/caption", CAPTION), ("/ask", ("what?",)), ("/match", ("a circle",)))]
    tried += [(kind, reason, "/caption", CAPTION)
              for kind, reason in (("truncated", "Truncated File Read"), ("bomb", "over the limit"))]
    for kind, reason, api_name, after in tried:
        with pytest.raises(AppError, match=f"^cannot read the image: .*{reason}"):
            client.predict(handle_file(str(broken[kind])), *after, api_name=api_name)


@needs_gradio
def test_a_url_for_a_file_is_refused_and_not_fetched(client, monkeypatch):
    import gradio.processing_utils
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from stages.apps.web_guards import NOT_AN_UPLOAD

    fetched = []

    async def record(url, cache_dir):
        fetched.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(gradio.processing_utils, "async_ssrf_protected_download", record)  # the server is in this process
    with pytest.raises(AppError, match=NOT_AN_UPLOAD):
        client.predict(handle_file("https://example.com/cat.png"), "a circle", api_name="/match")
    assert fetched == []


@needs_gradio
def test_the_image_input_takes_only_this_servers_uploads(tmp_path):
    import gradio as gr
    from gradio.data_classes import ImageData

    from stages.apps.serve import import_gradio
    from stages.apps.web_guards import upload_folder, uploaded_image

    import_gradio()
    with upload_folder() as folder:
        image = uploaded_image()
        (folder / "a").mkdir()
        (folder / "a" / "x.png").write_bytes(b"not read here")
        assert image.preprocess(ImageData(path=str(folder / "a" / "x.png"))) == str(folder / "a" / "x.png")  # unopened
        for elsewhere in ("/etc/hostname", str(folder / ".." / "x.png"), "https://example.com/x.png"):
            with pytest.raises(gr.Error):
                image.preprocess(ImageData(path=elsewhere))
    assert not folder.exists()


@needs_gradio
def test_the_slider_ends_where_caption_refuses(page_models, client, caplog, capsys):
    from qformer.generation import CAPTION_PROMPT, max_new_tokens_for
    from stages.apps.serve import caption_image

    models, root = page_models
    image = str(root / "data" / "images" / "000001.png")
    limit = max_new_tokens_for(*models.stage2, [CAPTION_PROMPT])
    [slider] = [c["props"] for c in client.config["components"] if c["props"].get("label") == "max new tokens"]
    assert slider["maximum"] == limit

    with caplog.at_level("WARNING"):
        assert caption_image(models, image, num_beams=1, max_new_tokens=limit)
    assert "was cut" not in caplog.text  # the prompt was read whole
    longer = CAPTION_PROMPT + " a red circle"
    room = max_new_tokens_for(*models.stage2, [longer])
    assert room < limit
    with pytest.raises(ValueError, match=f"^max new tokens {limit} is too many: at most {room} new tokens fit with this prompt"):
        caption_image(models, image, prompt=longer, num_beams=1, max_new_tokens=limit)  # the page's words, no flag
    stage2 = str(root / "stage2")
    assert main(["caption", "--model", stage2, image, "--num-beams", "1", "--max-new-tokens", str(limit + 1)]) == 2
    assert f"--max-new-tokens {limit + 1} is too many: at most {limit} new tokens fit" in capsys.readouterr().err
    assert main(["caption", "--model", stage2, image, "--num-beams", "1", "--max-new-tokens", str(limit)]) == 0


@needs_gradio
def test_a_busy_port_is_named_with_the_option(page_models, capsys):
    _, root = page_models
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--stage2", str(root / "stage2"), "--port", str(port)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f"port {port} is busy" in line and "--port" in line


@needs_gradio
def test_uploads_are_capped(monkeypatch):
    import httpx

    from stages.apps import serve, web_guards

    serve.import_gradio()
    monkeypatch.setattr(web_guards, "MAX_UPLOADS_TOTAL", 1000)
    with web_guards.upload_folder() as folder:
        app = serve.build_app(serve.Models())
        serve.launch(app, "127.0.0.1", free_port(), block=False)
        try:
            upload = f"{app.local_url}gradio_api/upload"
            assert httpx.post(upload, files={"files": ("a.png", b"x" * 600)}).status_code == 200
            refused = httpx.post(upload, files={"files": ("b.png", b"x" * 600)})
        finally:
            app.close()
        assert refused.status_code == 413 and "keeps at most" in refused.text
        assert [p.name for p in folder.rglob("*") if p.is_file()] == ["a.png"]


@needs_gradio
def test_serve_warns_on_an_open_host_and_removes_the_uploads_when_stopped(page_models, monkeypatch, capsys):
    import httpx
    from gradio.utils import get_upload_folder

    from stages.apps import serve

    _, root = page_models
    launch, seen = serve.launch, {}

    def launch_upload_and_stop(app, host, port, block=True):
        launch(app, "127.0.0.1", port, block=False)  # the real server, reached on loopback
        assert httpx.post(f"{app.local_url}gradio_api/upload", files={"files": ("a.png", b"x" * 100)}).status_code == 200
        seen["folder"] = Path(get_upload_folder())
        seen["files"] = [p.name for p in seen["folder"].rglob("*") if p.is_file()]
        app.close()
        raise SystemExit(143)  # what SIGTERM raises in a command (stages.cli)

    monkeypatch.setattr(serve, "launch", launch_upload_and_stop)
    with pytest.raises(SystemExit):
        serve.serve(stage2=str(root / "stage2"), host="0.0.0.0", port=free_port())
    assert seen["files"] == ["a.png"] and not seen["folder"].exists()
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "--host 0.0.0.0" in warning and "no login" in warning


@pytest.mark.slow  # a process of its own: ~25 s to import and load on a busy machine
@needs_gradio
def test_serve_on_every_interface_warns_and_leaves_no_upload_behind(page_models, tmp_path):
    """The real command in a process of its own: the warning, then SIGTERM, then nothing left in the temporary folder."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    _, root = page_models
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    command = [sys.executable, "-m", "stages.cli", "serve", "--stage2", str(root / "stage2"),
               "--host", "0.0.0.0", "--port", str(port)]
    server = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):  # up to 60 s to load the models and start
            try:
                if httpx.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.post(f"{url}gradio_api/upload", files={"files": ("a.png", b"x" * 100)}).status_code == 200
        assert [p.name for p in tmp.rglob("*") if p.is_file()] == ["a.png"]
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    finally:
        server.kill()
        errors = server.stderr.read()
    warnings = [line for line in errors.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--host 0.0.0.0" in warnings[0] and "no login" in warnings[0]
    assert [p for p in tmp.rglob("*") if p.is_file()] == []
