"""``vlm serve``: a local web page to upload an image and chat with the model (``vlm.model.serve``)."""
from __future__ import annotations

import argparse

from vlm.cli.generate import add_model_and_decoding, decoding_of
from vlm.model.chat import load_chat_model
from vlm.model.serve import make_server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm serve --ckpt DIR|--hf-model DIR [--host H] [--port P]``."""
    add_model_and_decoding(parser)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once, then answer the page's questions until interrupted (Ctrl-C)."""
    server = make_server(load_chat_model(args.ckpt, args.hf_model), decoding_of(args), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"vlm serve: open http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
