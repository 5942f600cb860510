"""What keeps `qformer serve`'s page to its own uploads and its own machine.

gradio, left to itself, opens an upload with PIL before the function sees it, downloads any URL an API request
names as a file, keeps every upload in a shared temporary folder forever and caps only the size of one file.
Here: an image input that passes on the path of a file uploaded to this server and nothing else, a folder of this
run's own for the uploads (capped, removed when the server stops), and the checks of --port and --host.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

MAX_UPLOADS_TOTAL = 512 * 2**20  # everything one run of the server keeps (each file: serve.MAX_UPLOAD)
NOT_AN_UPLOAD = "the page reads only images uploaded to it, not URLs or the server's files: upload the image"


def uploaded_image(**options):
    """An image input that gives the function the path of a file uploaded to this page, unopened.

    gradio's own Image opens the upload with PIL before the function runs (a broken file then shows a bare
    "Error", not the reader's reason), and downloads a URL that an API request sends as the file's path. This one
    takes only a file in this server's upload folder and leaves the reading to `ImageReader`. The two methods are
    replaced on the instance: gradio writes a .pyi file beside the module of any subclass of its components.
    """
    import gradio as gr
    from gradio.utils import is_in_or_equal
    from gradio_client.utils import is_http_url_like

    image = gr.Image(type="filepath", image_mode=None, label="image", sources=["upload"], height=320, **options)
    move_to_cache = image.async_move_resource_to_block_cache

    def upload_path(payload) -> str | None:
        if payload is None:
            return None
        if payload.path is None or not is_in_or_equal(payload.path, image.GRADIO_CACHE):
            raise gr.Error(NOT_AN_UPLOAD, print_exception=False)
        return payload.path

    async def uploads_only(url_or_file_path):  # gradio calls this before `preprocess`, and would download a URL here
        if url_or_file_path is not None and is_http_url_like(str(url_or_file_path)):
            raise gr.Error(NOT_AN_UPLOAD, print_exception=False)
        return await move_to_cache(url_or_file_path)

    image.preprocess, image.async_move_resource_to_block_cache = upload_path, uploads_only
    return image


@contextlib.contextmanager
def upload_folder():
    """A fresh folder for this run's uploads (gradio's GRADIO_TEMP_DIR), removed with them when the server stops.

    Build the page and launch it inside: gradio reads the folder when components are made and when it starts.
    """
    folder = tempfile.mkdtemp(prefix="qformer-serve-uploads-")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = folder
    try:
        yield Path(folder)
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def folder_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def capped_uploads():
    """The server's middleware that holds this run's uploads to MAX_UPLOADS_TOTAL (call inside `upload_folder`)."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    return Middleware(UploadCap, folder=get_upload_folder(), limit=MAX_UPLOADS_TOTAL)


class UploadCap:
    """Refuses an upload (413) that would take this run's upload folder past `limit` bytes (gradio caps one file)."""

    def __init__(self, app, folder: str, limit: int):
        self.app, self.folder, self.limit = app, folder, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/upload"):
            incoming = int(dict(scope["headers"]).get(b"content-length", b"0") or 0)  # absent: the folder alone decides
            if folder_bytes(self.folder) + incoming > self.limit:
                from starlette.responses import PlainTextResponse

                full = (f"the server keeps at most {self.limit / 2**20:g} MB of uploads and that is used up: "
                        f"restart qformer serve to remove them")
                return await PlainTextResponse(full, status_code=413)(scope, receive, send)
        return await self.app(scope, receive, send)


def check_port(host: str, port: int) -> None:
    """Refuse a busy port or an address this machine does not have, naming --port or --host, before loading models."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} is busy (another program listens on it): pass --port with a free one") from None
        raise OSError(f"cannot listen on --host {host} --port {port}: {error.strerror or error}") from None


def exposure_warning(host: str) -> str | None:
    """One line for a `host` other machines can reach: the page has no login."""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name other than localhost: it may be reachable
        pass
    return (f"qformer serve: warning: --host {host} opens the page to the network and it has no login: anyone who can "
            f"reach this machine can use it and upload files (--host 127.0.0.1 keeps it to this machine)")
