"""Start the BLIP-2 chat app: ``python app.py`` serves the offline default model at http://127.0.0.1:7860.

This file is the only place where the app meets ``blip2`` (and torch): ``Blip2Backend`` adapts a loaded model to
the small interface in ``app/backend.py``; ``app/`` itself never imports torch. With ``--server-url`` the answers
come from an OpenAI-compatible model server (vLLM; ``app/remote.py``) and neither blip2 nor torch is imported.
Every option has an environment variable (for Hugging Face Spaces and containers); a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# blip2 (and with it torch) is imported where a local model is used, never at the top: the --server-url path
# must start without it.
from app.backend import BackendUnavailable, BadImage, HistoryTurn, ModelCard, ReplyStats  # noqa: E402

try:  # ZeroGPU Spaces: run generation under spaces.GPU; elsewhere this decorator is a no-op
    import spaces  # type: ignore[import-not-found]

    _gpu = spaces.GPU
except Exception:  # noqa: BLE001 - not installed (or broken): no ZeroGPU
    def _gpu(fn):
        return fn


class _Stream:
    """A blip2.TextStream seen as an app.backend.ReplyStream (text chunks, cancel(), reply as ReplyStats)."""

    def __init__(self, text_stream: blip2.TextStream):
        self._stream = text_stream

    def __iter__(self):
        return _iterate(self._stream)

    def cancel(self) -> None:
        self._stream.cancel()

    @property
    def reply(self) -> ReplyStats | None:
        r = self._stream.reply
        if r is None:
            return None
        return ReplyStats(text=r.text, prompt_tokens=r.prompt_tokens, new_tokens=r.new_tokens, seconds=r.seconds,
                          first_token_seconds=r.first_token_seconds, notice=r.notice, cancelled=r.cancelled,
                          extra=dict(reused_prefix_tokens=r.reused_prefix_tokens, dropped_turns=r.dropped_turns),
                          token_ids=list(r.token_ids))


@_gpu
def _iterate(text_stream):
    """Generation happens while this generator is consumed; on ZeroGPU that is when a GPU is attached."""
    yield from text_stream


class Blip2Backend:
    """``app.backend.Backend`` over a loaded ``blip2.Blip2``; InvalidImageError becomes BadImage."""

    def __init__(self, model: blip2.Blip2):
        self.model = model
        info = model.info
        self.card = ModelCard(source=info.source, precision=info.precision, device=info.device,
                              llm_family=info.llm_family, untrained=info.untrained, notes=tuple(info.notes),
                              context_length=model.context_length)

    def check_image(self, image: bytes) -> None:
        import blip2

        try:
            blip2.load_image(image)
        except blip2.InvalidImageError as exc:
            raise BadImage(str(exc)) from None

    def _start(self, call) -> _Stream:
        import blip2

        try:
            return _Stream(call())
        except blip2.InvalidImageError as exc:
            raise BadImage(str(exc)) from None
        except blip2.PromptTooLongError as exc:
            raise ValueError(str(exc)) from None

    def chat(self, image: bytes, history: Sequence[HistoryTurn], message: str, settings: dict) -> _Stream:
        # Turns pass through as they are: blip2 puts a turn's token ids (this conversation's own) back in the prompt
        # where they still decode to its text, so the previous turn's key/values are reused.
        return self._start(lambda: self.model.chat(image, list(history), message, stream=True, **settings))

    def caption(self, image: bytes, settings: dict) -> _Stream:
        prompt = self.model.prompt_format.caption_prompt
        return self._start(lambda: self.model.stream(image, prompt, **settings))


def _env(name: str, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=_env("BLIP2_MODEL", "default"),
                   help='"default", a hub id or a checkpoint folder (env BLIP2_MODEL)')
    p.add_argument("--server-url", default=_env("BLIP2_SERVER_URL"),
                   help="answer through an OpenAI-compatible server (vLLM), e.g. http://HOST:8000/v1; no local\n"
                        "model is loaded (env BLIP2_SERVER_URL; API key, if any, in env BLIP2_SERVER_API_KEY)")
    p.add_argument("--served-model", default=_env("BLIP2_SERVED_MODEL"),
                   help="the model name the server serves; default: the first it lists (env BLIP2_SERVED_MODEL)")
    p.add_argument("--server-timeout", type=float, default=float(_env("BLIP2_SERVER_TIMEOUT", "60")),
                   help="seconds to wait for the server to connect or send the next part of an answer\n"
                        "(env BLIP2_SERVER_TIMEOUT)")
    p.add_argument("--precision", default=_env("BLIP2_PRECISION", "auto"),
                   help="fp32 | bf16 | fp16 | int8 | nf4 | auto (env BLIP2_PRECISION)")
    p.add_argument("--device", default=_env("BLIP2_DEVICE", "auto"), help="auto | cpu | cuda | cuda:N (env BLIP2_DEVICE)")
    p.add_argument("--db-url", default=_env("BLIP2_DB_URL"),
                   help="SQLAlchemy URL; default SQLite in the data dir (env BLIP2_DB_URL)")
    p.add_argument("--data-dir", default=_env("BLIP2_DATA_DIR", "data"), help="history and images (env BLIP2_DATA_DIR)")
    p.add_argument("--host", default=_env("BLIP2_HOST", _env("GRADIO_SERVER_NAME", "127.0.0.1")),
                   help="address to listen on (env BLIP2_HOST or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=int(_env("BLIP2_PORT", _env("GRADIO_SERVER_PORT", "7860"))),
                   help="port (env BLIP2_PORT or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", default=_env("BLIP2_SHARE", "") in ("1", "true", "True"),
                   help="a public gradio.live link (needs network; env BLIP2_SHARE=1)")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                   help="require a login; repeatable (env BLIP2_AUTH, comma-separated)")
    p.add_argument("--auth-file", default=_env("BLIP2_AUTH_FILE"),
                   help="file with one USER:PASSWORD per line (env BLIP2_AUTH_FILE)")
    p.add_argument("--max-concurrency", type=int, default=int(_env("BLIP2_MAX_CONCURRENCY", "1")),
                   help="generations running at once (env BLIP2_MAX_CONCURRENCY)")
    p.add_argument("--queue-size", type=int, default=int(_env("BLIP2_QUEUE_SIZE", "16")),
                   help="requests waiting at most; more are told the app is busy (env BLIP2_QUEUE_SIZE)")
    p.add_argument("--max-message-chars", type=_positive_int, default=_env("BLIP2_MAX_MESSAGE_CHARS", "4000"),
                   help="longest message accepted, in characters (env BLIP2_MAX_MESSAGE_CHARS)")
    p.add_argument("--upload-dir", default=_env("BLIP2_UPLOAD_DIR"),
                   help="Gradio's upload folder, swept by the app; default <data-dir>/uploads (env BLIP2_UPLOAD_DIR)")
    p.add_argument("--upload-ttl-minutes", type=_positive_int, default=_env("BLIP2_UPLOAD_TTL_MINUTES", "60"),
                   help="uploaded files are deleted after this long (env BLIP2_UPLOAD_TTL_MINUTES)")
    p.add_argument("--upload-max-mb", type=_positive_int, default=_env("BLIP2_UPLOAD_MAX_MB", "2048"),
                   help="cap on the upload folder's size; the oldest files go first (env BLIP2_UPLOAD_MAX_MB)")
    return p.parse_args(argv)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {number}")
    return number


def upload_sweeper(args: argparse.Namespace):
    """Point Gradio's upload folder (GRADIO_TEMP_DIR) at a folder of the app's own and return the sweeper that keeps
    it bounded (app/uploads.py; start() it). Set before the UI is built: Gradio reads the variable then."""
    from app.uploads import UploadSweeper

    folder = Path(args.upload_dir or Path(args.data_dir) / "uploads").resolve()
    data_dir = Path(args.data_dir).resolve()
    if data_dir == folder or folder in data_dir.parents:  # the sweep would delete the history itself
        raise SystemExit(f"error: --upload-dir {folder} must not contain the data dir {data_dir}")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return UploadSweeper(folder, max_age_s=args.upload_ttl_minutes * 60, max_bytes=args.upload_max_mb * 2**20)


def parse_auth(entries: Sequence[str] | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """[(user, password), ...] from USER:PASSWORD entries, BLIP2_AUTH and an auth file; None when empty."""
    lines = list(entries or [])
    if not entries and _env("BLIP2_AUTH"):
        lines += _env("BLIP2_AUTH").split(",")
    if auth_file:
        lines += [line for line in Path(auth_file).read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    pairs = []
    for line in lines:
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"error: --auth wants USER:PASSWORD, got {line.strip()!r}")
        pairs.append((user, password))
    return pairs or None


def browser_secret(data_dir: str | Path) -> str:
    """The key the browser's anonymous id is encrypted with, kept in the data dir so ids survive a restart."""
    path = Path(data_dir) / "browser_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        path.write_text(secret)
        path.chmod(0o600)
        return secret


def local_backend(args: argparse.Namespace) -> Blip2Backend:
    import blip2

    try:
        model = blip2.load(args.model, precision=args.precision, device=args.device)
    except blip2.Blip2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Loaded {model.info.summary()}", flush=True)  # which model, precision and device
    return Blip2Backend(model)


def remote_backend(args: argparse.Namespace):
    """The model server's backend. A server that is down does not stop the app when the model is named: the header
    shows it down and each reply says so until it is back. Unnamed, the server must answer to say what it serves."""
    from app.remote import RemoteBackend

    try:
        backend = RemoteBackend(args.server_url, args.served_model, timeout=args.server_timeout,
                                api_key=_env("BLIP2_SERVER_API_KEY"))
    except (BackendUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    up, line = backend.health()
    print(f"Answering through {args.server_url} (model {backend.model}; {line})", flush=True)
    return backend


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth, args.auth_file)
    sweeper = upload_sweeper(args)  # before gradio is imported: some of its modules read GRADIO_TEMP_DIR then
    from app.store import ConversationStore
    from app.ui import build_ui

    backend = remote_backend(args) if args.server_url else local_backend(args)
    store = ConversationStore(db_url=args.db_url, data_dir=args.data_dir)
    sweeper.start()
    demo = build_ui(backend, store, auth=auth, max_concurrency=args.max_concurrency, queue_size=args.queue_size,
                    browser_secret=browser_secret(args.data_dir), max_message_chars=args.max_message_chars)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    finally:
        sweeper.stop()
        store.close()


if __name__ == "__main__":
    main()
