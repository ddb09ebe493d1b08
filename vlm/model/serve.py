"""A local web page to chat with a model about an uploaded image (``vlm serve``), standard library only.

``GET /`` is one HTML page (``PAGE``): a file input, a question box and the answers so far. Its
script posts ``{"image": data URL, "prompt": text}`` as JSON to ``POST /ask``; the reply is
``{"answer": text}``. A request with an image starts a new conversation about it (one image per
conversation, as ``ChatSession``); one without an image continues the current conversation.
Answers come from ``ChatSession.ask``, so they equal ``vlm generate`` / ``vlm chat``'s for the same
image, prompt and decoding. Requests are answered one at a time (one model, one conversation):
it is a local tool for one person, bound to 127.0.0.1 by default.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Optional

from PIL import Image, UnidentifiedImageError

from vlm.model.chat import ChatSession, Decoding

MAX_REQUEST_BYTES = 32 * 2 ** 20  # an uploaded image, base64-encoded

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vlm serve</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto} img{max-width:16em;display:block}
#log p{margin:.3em 0} .q{color:#555}</style></head>
<body><h1>Ask about an image</h1>
<p><input type="file" id="image" accept="image/*"> (a new image starts a new conversation)</p>
<img id="preview" alt="">
<p><input type="text" id="prompt" size="50" placeholder="Describe the image briefly.">
<button id="ask">Ask</button></p>
<div id="log"></div><p id="status"></p>
<script>
let pending = null;  // the data URL of an image not yet sent
document.getElementById("image").addEventListener("change", e => {
  const file = e.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { pending = reader.result; document.getElementById("preview").src = pending;
                          document.getElementById("log").innerHTML = ""; };
  reader.readAsDataURL(file);
});
function line(cls, text) {
  const p = document.createElement("p"); p.className = cls; p.textContent = text;
  document.getElementById("log").appendChild(p);
  return p;
}
document.getElementById("ask").addEventListener("click", async () => {
  const prompt = document.getElementById("prompt").value;
  const status = document.getElementById("status");
  const body = {prompt: prompt};
  if (pending) body.image = pending;
  status.textContent = "thinking...";
  const reply = await fetch("/ask", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body)});
  const data = await reply.json();
  if (!reply.ok) { status.textContent = data.error; return; }
  pending = null;
  line("q", prompt);
  line("answer", data.answer);
  status.textContent = "";
});
</script></body></html>
"""


class BadRequest(ValueError):
    """A request the page should not have sent: the reason goes back as ``{"error": ...}`` with 400."""


def decode_image(data_url: str) -> Image.Image:
    """A ``data:image/...;base64,...`` URL (what the page's FileReader makes) -> an RGB image."""
    header, _, payload = data_url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequest("image must be a base64 data URL (data:image/...;base64,...)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as im:
            return im.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise BadRequest(f"the uploaded file is not an image PIL can read ({e})") from e


class ChatService:
    """The model and the current conversation; ``ask(prompt, image=None) -> answer``."""

    def __init__(self, model, decoding: Optional[Decoding] = None):
        self.model = model
        self.decoding = decoding or Decoding()
        self.session: Optional[ChatSession] = None

    def ask(self, prompt: str, image: Optional[Image.Image] = None) -> str:
        if not prompt.strip():
            raise BadRequest("the question is empty")
        if image is not None:
            self.session = ChatSession(self.model, image, self.decoding)
        if self.session is None:
            raise BadRequest("upload an image first")
        return self.session.ask(prompt.strip())


def make_handler(service: ChatService) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``service``."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, obj: dict) -> None:
            self._reply(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] in ("/", "/index.html"):
                self._reply(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/ask":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                if not 0 < length <= MAX_REQUEST_BYTES:
                    raise BadRequest(f"request body must be 1..{MAX_REQUEST_BYTES} bytes, got {length}")
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
                    raise BadRequest('send JSON {"prompt": text, "image": data URL (optional)}')
                image = decode_image(request["image"]) if request.get("image") else None
                self._json(HTTPStatus.OK, {"answer": service.ask(request["prompt"], image)})
            except (BadRequest, json.JSONDecodeError, ValueError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            pass  # the command prints its own line; a request log is noise on a local tool

    return Handler


def make_server(model, decoding: Optional[Decoding] = None, host: str = "127.0.0.1", port: int = 8000) -> HTTPServer:
    """An ``HTTPServer`` answering one request at a time (port 0: a free one, see ``server_address``)."""
    return HTTPServer((host, port), make_handler(ChatService(model, decoding)))
