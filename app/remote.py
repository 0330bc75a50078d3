"""A backend that asks an OpenAI-compatible model server instead of a model in this process.

The server we test against is vLLM serving an official ``Blip2ForConditionalGeneration`` checkpoint with an OPT LLM
(``python app.py --server-url http://HOST:PORT/v1 --served-model NAME``; docs/hosting.md, "Scale out"). The app
then holds no model: many app instances can share one server, and the server batches their requests.

What crosses the wire: one chat-completions request per reply with the picture as a data URL in the first user
message, the conversation's turns as messages, ``stream=True`` (Server-Sent Events), and the decoding settings
mapped to the API's fields (:func:`sampling_fields`; the ones with no field are named in the model card's notes).
Stopping a reply closes the HTTP stream, which makes vLLM abort the request. A server that is down, too slow or
failing raises :class:`app.backend.BackendUnavailable` with a sentence for the chat.

Only httpx (a Gradio dependency) and Pillow: no torch, no tokenizer. Token counts come from the server.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps

from app.backend import BackendUnavailable, BadImage, HistoryTurn, ModelCard, ReplyStats

# Mirrors blip2.images (app/ must not import blip2): the same pictures are accepted as with a local model.
ALLOWED_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                   "GIF": "image/gif", "BMP": "image/bmp"}
MAX_PIXELS = 40_000_000
MAX_SIDE = 2048  # a JPEG over MAX_PIXELS is downscaled to this, as blip2 does, instead of refused
# What the chat-completions API cannot express, said once in the UI (ModelCard.notes) instead of failing silently.
UNSUPPORTED = ("beam search (num_beams > 1 decodes greedily)", "length penalty (beam search only)",
               "no-repeat n-gram size")
# vLLM says a prompt is too long with a 400 whose message names the context length; older turns are then dropped.
_TOO_LONG = re.compile(r"context length|maximum model length|too long|max_model_len", re.IGNORECASE)
HEALTH_CACHE_S = 5.0


def sampling_fields(settings: dict) -> dict:
    """The app's decoding settings as chat-completions fields (OpenAI's plus vLLM's extra sampling parameters).

    Greedy (``do_sample`` false) is temperature 0, which vLLM decodes greedily; beam search has no field in the
    streaming chat API, so ``num_beams`` > 1 also decodes greedily (said in the card's notes). Fields at their
    neutral value are left out, so servers without vLLM's extras accept the request."""
    s = settings
    fields: dict = {"max_tokens": int(s.get("max_new_tokens", 64))}
    if s.get("do_sample"):
        fields["temperature"] = float(s.get("temperature", 1.0))
        fields["top_p"] = float(s.get("top_p", 1.0))
        if s.get("top_k"):
            fields["top_k"] = int(s["top_k"])
        if s.get("seed") is not None:
            fields["seed"] = int(s["seed"])
    else:
        fields["temperature"] = 0.0
    if s.get("min_new_tokens"):
        fields["min_tokens"] = int(s["min_new_tokens"])
    if s.get("repetition_penalty", 1.0) != 1.0:
        fields["repetition_penalty"] = float(s["repetition_penalty"])
    return fields


def build_messages(image_url: str, history: Sequence[HistoryTurn], message: str) -> list[dict]:
    """Chat messages for ``message`` after ``history``; the picture goes with the first user message (BLIP-2 takes
    one image per prompt and vLLM puts its query tokens at the start, as transformers' processor does). A turn's
    token ids (third element) cannot be sent through this API and are dropped: the server re-tokenizes the text."""
    messages: list[dict] = []
    for turn in history:
        messages.append({"role": "user", "content": turn[0]})
        messages.append({"role": "assistant", "content": turn[1]})
    messages.append({"role": "user", "content": message})
    first = messages[0]
    first["content"] = [{"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": first["content"]}]
    return messages


def image_data_url(image: bytes) -> str:
    """A data URL for ``image`` after the checks blip2 makes (BadImage if it fails them). The bytes are sent as
    they are where the server decodes them to the pixels a local model would see; an EXIF rotation, transparency
    or an oversized JPEG is resolved here first and sent as PNG, so the server sees the same upright RGB picture."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over Pillow's limit: refused below
        try:
            img = Image.open(io.BytesIO(image))
            fmt = img.format
            if fmt not in ALLOWED_FORMATS:
                raise BadImage(f"Unsupported image format {fmt or 'unknown'}; use JPEG, PNG, WEBP, GIF or BMP.")
            if img.width * img.height > MAX_PIXELS:
                if fmt not in ("JPEG", "MPO"):
                    raise BadImage(f"The image has {img.width}x{img.height} pixels; the limit is "
                                   f"{MAX_PIXELS // 1_000_000} million.")
                img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # libjpeg decodes at 1/2..1/8 scale: cheap
            img.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage("The image is too large to decode safely.") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt data
            raise BadImage(f"The file could not be read as an image ({type(exc).__name__}).") from None
    if img.width < 1 or img.height < 1:
        raise BadImage("The image is empty.")
    rotated = img.getexif().get(0x0112, 1) not in (1, None)
    plain = fmt in ("JPEG", "PNG") and img.mode == "RGB" and not rotated and img.width * img.height <= MAX_PIXELS
    if plain:
        data, mime = image, ALLOWED_FORMATS[fmt]
    else:
        img = ImageOps.exif_transpose(img)
        img = _eight_bit(img)
        if img.mode in ("RGBA", "LA", "PA", "P") and ("transparency" in img.info or img.mode.endswith("A")):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparency over white, as blip2 does
        img = img.convert("RGB")
        if max(img.size) > MAX_SIDE and img.width * img.height > MAX_PIXELS:
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled to 8 bit as blip2.images does (v / 257 rounded; F clipped to 0..255):
    Pillow's own convert("RGB") clips 16-bit samples at 255, which would send a mostly white picture."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        samples = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((samples + 128) // 257).astype(np.uint8))
    if img.mode == "F":
        samples = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.rint(np.clip(samples, 0, 255)).astype(np.uint8))
    return img


class RemoteStream:
    """One reply streamed from the server (an ``app.backend.ReplyStream``). The request is made when iteration
    starts; ``cancel()`` stops at the next chunk and closing the iterator closes the HTTP stream, which is what
    makes vLLM abort the request (the app's chat does both when a reply is stopped)."""

    def __init__(self, backend: RemoteBackend, body: dict, history: list, message: str, image_url: str):
        self._backend, self._body, self._history, self._message = backend, body, history, message
        self._image_url = image_url
        self._cancelled = threading.Event()
        self.reply: ReplyStats | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        state = dict(parts=[], first=None, usage=None, ids=[], finish=None, dropped=0)
        try:
            yield from self._run(state, t0)
        except httpx.TimeoutException:
            if not self._cancelled.is_set():
                raise BackendUnavailable(self._backend.describe_timeout()) from None
        except httpx.TransportError as exc:  # refused, reset, closed mid-answer
            if not self._cancelled.is_set():
                raise BackendUnavailable(self._backend.describe_transport(exc, started=bool(state["parts"]))) from None
        finally:
            text = "".join(state["parts"])
            usage = state["usage"] or {}
            notice = None
            if state["dropped"]:
                notice = (f"The conversation was too long for the model: the oldest {state['dropped']} turn(s) "
                          "were left out of this answer's context.")
            self.reply = ReplyStats(
                text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                new_tokens=int(usage.get("completion_tokens") or len(state["ids"]) or len(state["parts"])),
                seconds=time.perf_counter() - t0, first_token_seconds=state["first"], notice=notice,
                cancelled=self._cancelled.is_set() or state["finish"] is None,
                extra=dict(finish_reason=state["finish"], dropped_turns=state["dropped"]),
                token_ids=list(state["ids"]) if state["ids"] and state["finish"] is not None else None)

    def _run(self, state: dict, t0: float) -> Iterator[str]:
        history = list(self._history)
        while True:
            body = dict(self._body, messages=build_messages(self._image_url, history, self._message))
            if not self._backend.streaming:
                response = self._backend.post(body)
                if response.status_code == 400 and history and _TOO_LONG.search(response.text):
                    history, state["dropped"] = history[1:], state["dropped"] + 1
                    continue
                self._backend.raise_for_status(response)
                self._take(state, response.json(), t0)
                if state["parts"]:
                    yield "".join(state["parts"])
                return
            with self._backend.stream(body) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code == 400 and history and _TOO_LONG.search(response.text):
                        history, state["dropped"] = history[1:], state["dropped"] + 1
                        continue
                    self._backend.raise_for_status(response)
                for line in response.iter_lines():
                    if self._cancelled.is_set():
                        return  # leaving the with-block closes the stream: the server stops generating
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    before = len(state["parts"])
                    self._take(state, json.loads(data), t0)
                    for chunk in state["parts"][before:]:
                        yield chunk
                if state["finish"] is None and not self._cancelled.is_set():
                    # The body ended without a finish reason: a server that dies while streaming without chunked
                    # encoding just closes the connection, which is a valid end of an HTTP body.
                    raise BackendUnavailable(self._backend.describe_transport(None, started=bool(state["parts"])))
                return

    def _take(self, state: dict, event: dict, t0: float) -> None:
        """Fold one response (or one streamed chunk) into ``state``."""
        if event.get("object") == "error" or "error" in event:  # vLLM reports a failure mid-stream as an event
            err = event.get("error", event)
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise BackendUnavailable(f"The model server failed during the answer: {_short(message)}")
        if event.get("usage"):
            state["usage"] = event["usage"]
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
            if choice.get("token_ids"):  # vLLM with return_token_ids: what the model generated
                state["ids"].extend(choice["token_ids"])
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]
            if text:
                if state["first"] is None:
                    state["first"] = time.perf_counter() - t0
                state["parts"].append(text)


class RemoteBackend:
    """``app.backend.Backend`` over an OpenAI-compatible server at ``base_url`` (e.g. ``http://host:8000/v1``).

    ``model`` is the served model's name; None asks the server (``GET /models``) and takes the first. ``timeout``
    bounds connecting and each wait for data (not a whole answer, which streams). ``streaming=False`` asks for
    whole answers, for proxies that buffer Server-Sent Events. Extra fields of vLLM are sent (``add_special_tokens``:
    vLLM's chat endpoint leaves out the BOS token an official BLIP-2 OPT prompt starts with unless asked)."""

    def __init__(self, base_url: str, model: str | None = None, *, timeout: float = 60.0, api_key: str | None = None,
                 streaming: bool = True, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.streaming = streaming
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url + "/", headers=headers, transport=transport,
                                    timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
        self._health: tuple[float, bool, str] | None = None
        listed = self._list_models(required=model is None)
        if model is None:
            model = listed[0]["id"]
        elif listed and model not in {m.get("id") for m in listed}:
            names = ", ".join(m.get("id", "?") for m in listed)
            raise ValueError(f"The server at {self.base_url} serves {names}, not {model!r} (--served-model).")
        self.model = model
        info = next((m for m in listed if m.get("id") == model), {})
        self.card = ModelCard(
            source=model, precision="server", device=f"vLLM at {self.host}", llm_family="decoder-only",
            notes=(f"Answers come from the model server at {self.base_url}. Not applied there: "
                   f"{', '.join(UNSUPPORTED)}.",),
            context_length=info.get("max_model_len"))

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc or self.base_url

    def close(self) -> None:
        self._client.close()

    # -- requests ------------------------------------------------------------------------------------------------
    def _list_models(self, required: bool) -> list[dict]:
        """The server's models; [] when it cannot be asked and ``required`` is false (the app starts anyway and says
        in the chat that the server is down, until it is up)."""
        try:
            response = self._client.get("models")
            self.raise_for_status(response)
            return list(response.json().get("data") or [])
        except (httpx.HTTPError, BackendUnavailable, ValueError) as exc:
            if required:
                raise BackendUnavailable(f"Cannot list the models of {self.base_url}: {exc}. Start the server "
                                         "first, or name the model with --served-model.") from None
            return []

    def _body(self, settings: dict) -> dict:
        body = dict(model=self.model, stream=self.streaming, add_special_tokens=True, return_token_ids=True,
                    **sampling_fields(settings))
        if self.streaming:
            body["stream_options"] = {"include_usage": True}  # token counts in the last chunk
        return body

    def post(self, body: dict) -> httpx.Response:
        return self._client.post("chat/completions", json=body)

    def stream(self, body: dict):
        return self._client.stream("POST", "chat/completions", json=body)

    def raise_for_status(self, response: httpx.Response) -> None:
        """A 4xx that describes the request (prompt too long, setting out of range) is a ValueError the chat shows;
        anything else from the server means it cannot answer now."""
        code = response.status_code
        if code < 400:
            return
        try:
            detail = response.json()
            detail = (detail.get("error") or detail) if isinstance(detail, dict) else detail
            message = detail.get("message", str(detail)) if isinstance(detail, dict) else str(detail)
        except ValueError:
            message = response.text
        if code in (400, 422):
            raise ValueError(f"The model server refused the request: {_short(message)}")
        if code in (401, 403):
            raise BackendUnavailable(f"The model server at {self.host} refused access (HTTP {code}); check the "
                                     "API key the app uses.")
        if code == 404:
            raise BackendUnavailable(f"The model server at {self.host} does not serve {self.model!r} (HTTP 404).")
        raise BackendUnavailable(f"The model server at {self.host} failed (HTTP {code}: {_short(message)}). "
                                 "Your message is kept; try again in a moment.")

    def describe_timeout(self) -> str:
        return (f"The model server at {self.host} did not answer within {self.timeout:g} s. Your message is kept; "
                "try again in a moment.")

    def describe_transport(self, exc: Exception | None, started: bool) -> str:
        if started:
            return (f"The connection to the model server at {self.host} was lost during the answer. Your message is "
                    "kept; try again once the server is back.")
        why = f" ({type(exc).__name__})" if exc is not None else ""
        return (f"The model server at {self.host} cannot be reached{why}. Your message is kept; try again once the "
                "server is back.")

    # -- Backend -------------------------------------------------------------------------------------------------
    def check_image(self, image: bytes) -> None:
        image_data_url(image)

    def chat(self, image: bytes, history: Sequence[HistoryTurn], message: str, settings: dict) -> RemoteStream:
        return RemoteStream(self, self._body(settings), list(history), message, image_data_url(image))

    def caption(self, image: bytes, settings: dict) -> RemoteStream:
        # The official zero-shot captioning prompt is empty; vLLM's BLIP-2 chat template renders an empty user
        # message as "Question:  Answer:", so the caption is an answer to no question, which is the closest the
        # chat API gets.
        return RemoteStream(self, self._body(settings), [], "", image_data_url(image))

    # -- status ----------------------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(up, a short line for the header): the server's ``/health`` (vLLM's, at the root, not under /v1), cached
        for a few seconds so a page full of browsers does not poll the server for each one."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_CACHE_S:
            return self._health[1], self._health[2]
        root = re.sub(r"/v1$", "", self.base_url)
        try:
            response = self._client.get(root + "/health", timeout=min(self.timeout, 3.0))
            if response.status_code == 404:  # not vLLM: any OpenAI-compatible server lists its models
                response = self._client.get("models", timeout=min(self.timeout, 3.0))
            up = response.status_code == 200
            line = "server up" if up else f"server error (HTTP {response.status_code})"
        except httpx.TimeoutException:
            up, line = False, "server not answering"
        except httpx.HTTPError:
            up, line = False, "server down"
        self._health = (now, up, line)
        return up, line


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
