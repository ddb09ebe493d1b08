"""``vlm serve``: the page answers as ``vlm generate`` does, through an HTTP upload and in a real
headless browser (Debian's chromium, driven over the DevTools protocol: the file input gets the
image with ``DOM.setFileInputFiles``, the page's own script uploads it and shows the answer)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from tiny_vlm import perturb_trainable, random_images, vlm_config
from vlm.cli import main
from vlm.model.chat import Decoding
from vlm.model.serve import make_server
from vlm.model.vision_language_model import VisionLanguageModel

QUESTION = "Is there a red circle in the image?"
TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tower_dir, tiny_llm_dir):
    """A tiny projector checkpoint, an image, ``vlm generate``'s answer, and the server on a free port."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, "projector"))
    perturb_trainable(model, seed=2)
    out = tmp_path_factory.mktemp("serve")
    model.save_pretrained(out / "ckpt")
    Image.fromarray(random_images(1, seed=4, size=40)[0]).save(out / "image.png")
    server = make_server(VisionLanguageModel.from_pretrained(out / "ckpt").eval(), Decoding(max_new_tokens=TOKENS),
                         port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def generate_answer(ckpt: Path, image: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--image", str(image), "--prompt", QUESTION,
                 "--max-new-tokens", str(TOKENS), "--no-stream"]) == 0
    return capsys.readouterr().out.strip()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/ask", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_upload_by_http_post(served, capsys):
    out, url = served
    want = generate_answer(out / "ckpt", out / "image.png", capsys)
    data_url = "data:image/png;base64," + base64.b64encode((out / "image.png").read_bytes()).decode()
    status, reply = post(url, {"image": data_url, "prompt": QUESTION})
    assert status == 200 and want and reply["answer"] == want
    status, reply = post(url, {"prompt": "Describe the image briefly."})  # the same conversation goes on
    assert status == 200 and isinstance(reply["answer"], str)
    status, reply = post(url, {"image": "data:image/png;base64,bm90IGFuIGltYWdl", "prompt": QUESTION})
    assert status == 400 and "not an image" in reply["error"]
    with urllib.request.urlopen(url + "/", timeout=10) as page:
        assert b'id="image"' in page.read()


# ------------------------------------------------------------------------------------------------
# A headless chromium and a minimal DevTools client (a WebSocket over the standard library)
# ------------------------------------------------------------------------------------------------

def chromium_binary() -> str:
    """Debian's chromium; installed with apt-get when missing (skips only where apt cannot run)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get cannot install it here (needs apt-get as root)")
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900)
    return shutil.which("chromium") or pytest.skip("apt-get install chromium gave no chromium binary")


class DevTools:
    """Send DevTools commands to one page target over a WebSocket (RFC 6455: masked client frames)."""

    def __init__(self, ws_url: str):
        host_port, path = ws_url.removeprefix("ws://").split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.startswith(b"HTTP/1.1 101"), response
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "chromium closed the DevTools connection"
            data += chunk
        return data

    def _send_frame(self, payload: bytes) -> None:
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                  if n < 2 ** 16 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _recv_message(self) -> dict:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            n = struct.unpack(">H", self._read(2))[0] if n == 126 else struct.unpack(">Q", self._read(8))[0] \
                if n == 127 else n
            message += self._read(n)
            if first & 0x80:
                return json.loads(message)

    def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send_frame(json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:  # events arrive between the replies; only the reply to this command matters
            message = self._recv_message()
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never made {expression!r} true")


@pytest.fixture
def browser(tmp_path):
    """A headless chromium with remote debugging on a free port -> the port."""
    profile = tmp_path / "profile"
    process = subprocess.Popen([chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
                                "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_page_in_headless_chromium(served, browser, capsys):
    """Upload the image through the page's file input, ask, and read the answer off the page."""
    out, url = served
    want = generate_answer(out / "ckpt", out / "image.png", capsys)
    with urllib.request.urlopen(f"http://127.0.0.1:{browser}/json/list", timeout=30) as reply:
        page = next(t for t in json.loads(reply.read()) if t["type"] == "page")
    tab = DevTools(page["webSocketDebuggerUrl"])
    tab("Page.navigate", url=url + "/")
    tab.wait_for("document.readyState === 'complete' && !!document.getElementById('image')")
    root = tab("DOM.getDocument")["root"]["nodeId"]
    file_input = tab("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    tab("DOM.setFileInputFiles", nodeId=file_input, files=[str(out / "image.png")])
    tab.wait_for("document.getElementById('preview').src.startsWith('data:image/png')")
    tab.evaluate(f"document.getElementById('prompt').value = {json.dumps(QUESTION)}; "
                 "document.getElementById('ask').click()")
    shown = tab.wait_for("(document.querySelector('#log .answer') || {}).textContent")
    assert want and shown == want
    assert tab.evaluate("document.querySelector('#log .q').textContent") == QUESTION
    tab.sock.close()


def test_vlm_serve_command(served):
    """``vlm serve --port 0`` loads the checkpoint, prints its address, serves the page and stops on SIGINT."""
    out, _ = served
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-m", "vlm.cli", "serve", "--ckpt", str(out / "ckpt"), "--port", "0"],
                               stdout=subprocess.PIPE, text=True, env=env,
                               # as from a terminal: a shell's background job (CI, `make test &`) ignores SIGINT
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        assert line.startswith("vlm serve: open http://127.0.0.1:"), line
        with urllib.request.urlopen(line.split("open ")[1].split()[0], timeout=30) as page:
            assert b"Ask about an image" in page.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
