"""``vlm chat``: a multi-turn conversation about an image in the terminal (``vlm.model.chat``).

Type a question and press Enter; the answer streams back. ``/image PATH`` looks at another image
(and starts a new conversation: one image per conversation), ``/reset`` forgets the turns,
``/quit`` (or end of input) leaves.
"""
from __future__ import annotations

import argparse
import sys

from vlm.cli.generate import add_model_and_decoding, decoding_of
from vlm.model.chat import ChatSession, load_chat_model, open_image, terminal_streamer

HELP = "commands: /image PATH (new image, new conversation), /reset, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm chat --ckpt DIR|--hf-model DIR --image PATH``."""
    add_model_and_decoding(parser)
    parser.add_argument("--image", required=True, help="the first image (/image PATH changes it)")
    parser.set_defaults(func=cmd_chat)


def handle_command(session: ChatSession, line: str) -> bool:
    """Run a ``/`` command; False when the session should end."""
    name, _, arg = line.partition(" ")
    if name == "/quit":
        return False
    if name == "/reset":
        session.reset()
        print("(conversation reset)")
    elif name == "/image" and arg.strip():
        try:
            session.set_image(open_image(arg.strip()))
            print(f"(now looking at {arg.strip()}; new conversation)")
        except (FileNotFoundError, OSError) as e:
            print(f"(cannot open it: {e})")
    else:
        print(HELP)
    return True


def cmd_chat(args: argparse.Namespace) -> int:
    """Read questions from stdin until ``/quit`` or end of input; stream each answer."""
    model = load_chat_model(args.ckpt, args.hf_model)
    session = ChatSession(model, open_image(args.image), decoding_of(args))
    streamer = terminal_streamer(model)
    print(HELP)
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line):
                return 0
            continue
        session.ask(line, streamer=streamer)
