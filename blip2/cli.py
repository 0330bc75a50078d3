"""Command line: ``python -m blip2 caption|ask|chat IMAGE ...``."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .decoding import Decoding
from .errors import Blip2Error
from .images import InvalidImageError
from .precision import PRECISIONS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Subparsers are built with the parent's class, so theirs report errors in one line too.
    parser = _Parser(prog="python -m blip2", description="BLIP-2: talk about images.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="default", help="hub id, checkpoint folder, or 'default' (offline)")
    common.add_argument("--precision", default="auto", choices=PRECISIONS)
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    common.add_argument("--low-memory", action="store_true", help="with --precision auto on GPU: int8")
    decoding = common.add_argument_group("decoding")
    defaults = Decoding()
    decoding.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    decoding.add_argument("--min-new-tokens", type=int, default=defaults.min_new_tokens)
    decoding.add_argument("--num-beams", type=int, default=defaults.num_beams)
    decoding.add_argument("--length-penalty", type=float, default=defaults.length_penalty)
    decoding.add_argument("--sample", dest="do_sample", action="store_true", help="nucleus sampling")
    decoding.add_argument("--temperature", type=float, default=defaults.temperature)
    decoding.add_argument("--top-p", type=float, default=defaults.top_p)
    decoding.add_argument("--top-k", type=int, default=defaults.top_k)
    decoding.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    decoding.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size)
    decoding.add_argument("--seed", type=int, default=None)
    common.add_argument("-v", "--verbose", action="store_true")

    sub = parser.add_subparsers(dest="command", required=True)
    caption = sub.add_parser("caption", parents=[common], help="print a caption")
    caption.add_argument("image")
    caption.add_argument("--prompt", default=None, help="override the model's caption prompt")
    ask = sub.add_parser("ask", parents=[common], help="answer a question about an image")
    ask.add_argument("image")
    ask.add_argument("question")
    chat = sub.add_parser("chat", parents=[common], help="interactive chat (/new IMAGE, /quit)")
    chat.add_argument("image")
    return parser


def decoding_from_args(args) -> Decoding:
    return Decoding(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
        length_penalty=args.length_penalty, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed,
    )


def main(argv=None, *, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        settings = decoding_from_args(args)
        from .images import load_image
        from .loading import load

        image = load_image(args.image)  # fail on a bad image before the slow model load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(args.model, args.precision, args.device, low_memory=args.low_memory)
        for note in model.info.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.command == "caption":
            prompt = args.prompt if args.prompt is not None else model.prompt_format.caption_prompt
            _print_stream(model.stream(image, prompt, **settings.to_dict()), stdout)
        elif args.command == "ask":
            _print_stream(model.chat(image, [], args.question, stream=True, **settings.to_dict()), stdout)
        else:
            _chat_loop(model, image, settings, stdin, stdout)
    except (Blip2Error, InvalidImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _print_stream(stream, stdout) -> str:
    parts = []
    try:
        for chunk in stream:
            parts.append(chunk)
            stdout.write(chunk)
            stdout.flush()
    finally:
        stream.cancel()
    stdout.write("\n")
    stdout.flush()
    return "".join(parts).strip()


def _chat_loop(model, image, settings: Decoding, stdin, stdout) -> None:
    from .images import load_image

    print(f"Chatting with {model.info.summary()}. Commands: /new IMAGE, /quit", file=stdout)
    history: list[tuple[str, str, list[int] | None]] = []  # (you, model, the model's token ids)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/new"):
            path = line[len("/new"):].strip()
            try:
                image = load_image(path) if path else image
            except InvalidImageError as exc:
                print(f"error: {exc}", file=stdout)
                continue
            history = []
            print("(new conversation)", file=stdout)
            continue
        stdout.write("model> ")
        try:
            stream = model.chat(image, history, line, stream=True, **settings.to_dict())
            reply = _print_stream(stream, stdout)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            stdout.write("\n(stopped)\n")
            continue
        # With the ids it generated, the next turn's prompt extends this one exactly and its key/values are reused.
        history.append((line, reply, stream.reply.token_ids if stream.reply else None))
