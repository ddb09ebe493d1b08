"""``vlm generate``: one answer about one image, streamed to the terminal (``vlm.model.chat``)."""
from __future__ import annotations

import argparse

import torch

from vlm.model.chat import ChatSession, Decoding, load_chat_model, open_image, terminal_streamer


def add_model_and_decoding(parser: argparse.ArgumentParser) -> None:
    """The flags ``vlm generate`` and ``vlm chat`` share: the model and how answers are drawn."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a stage-two checkpoint dir (projector or flamingo)")
    which.add_argument("--hf-model", help="a local HF VLM dir with a chat template (e.g. a vlm export)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")


def decoding_of(args: argparse.Namespace) -> Decoding:
    """The ``Decoding`` the flags ask for (seeding torch when sampling)."""
    if args.sample:
        torch.manual_seed(args.seed)
    return Decoding(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm generate --ckpt DIR|--hf-model DIR --image PATH --prompt TEXT``."""
    add_model_and_decoding(parser)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer ``--prompt`` about ``--image``; streamed token by token unless ``--no-stream``."""
    model = load_chat_model(args.ckpt, args.hf_model)
    session = ChatSession(model, open_image(args.image), decoding_of(args))
    answer = session.ask(args.prompt, streamer=None if args.no_stream else terminal_streamer(model))
    if args.no_stream:
        print(answer)
    return 0
