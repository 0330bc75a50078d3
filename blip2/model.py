"""The BLIP-2 runtime: frozen image encoder -> Q-Former -> projection -> frozen LLM, with generation and chat.

Module names match transformers' ``Blip2ForConditionalGeneration`` (``query_tokens``, ``qformer``,
``language_projection``, ``language_model``) so official checkpoints map onto this class one to one and what we
train can be exported back to the official format.

Generation goes through the LLM's own ``generate`` with the same inputs ``Blip2ForConditionalGeneration.generate``
builds (image query embeddings scattered into the prompt's image positions), so decoding behaviour, logits
processors and beam search are transformers' own. On top of it this class adds:

- an LRU cache of projected query embeddings keyed by image content, so a chat never re-runs the image encoder
  and Q-Former for the same picture;
- reuse of the prompt prefix's key/value cache across chat turns (decoder-only LLMs with a plain dynamic cache,
  greedy or sampled decoding), so turn N only prefills what turn N added;
- streaming with cancellation, a per-model lock (generation is not re-entrant), and context-length fitting.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import compute
from .decoding import Decoding
from .encoders import ImageEncoder
from .errors import PromptTooLongError
from .images import image_digest, load_image
from .prompts import PromptFormat, Rendered, Turn, prompt_ids

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What is serving: shown by the CLI and the app."""

    source: str
    precision: str
    device: str
    llm_family: str  # "decoder" | "encoder-decoder" | "chat"
    image_encoder: str = ""
    llm: str = ""
    untrained: bool = False  # the Q-Former/projection are random: answers ignore the image
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source} ({self.image_encoder} + {self.llm}) in {self.precision} on {self.device}"
        return text + (" [UNTRAINED Q-Former: the image is ignored]" if self.untrained else "")


@dataclass
class Reply:
    """One finished generation."""

    text: str
    token_ids: list[int]  # the generated tokens (special tokens included)
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    reused_prefix_tokens: int = 0  # prompt positions served from the key/value cache of an earlier turn
    dropped_turns: int = 0  # oldest history turns left out to fit the context
    truncated_message: bool = False  # the message itself was cut to fit
    cancelled: bool = False

    @property
    def notice(self) -> str | None:
        """A human sentence when the prompt was shortened, for the UI to show."""
        parts = []
        if self.dropped_turns:
            parts.append(f"the {self.dropped_turns} oldest turn(s) were left out")
        if self.truncated_message:
            parts.append("your message was cut short")
        return ("The conversation was too long for the model: " + " and ".join(parts) + ".") if parts else None


QFORMER_TEXT_TOKENS = 32  # instruction tokens an instruction-aware Q-Former reads


IMAGE_FEATURE_NORMS = ("none", "layernorm")


def normalize_image_features(image_embeds: torch.Tensor, kind: str = "none") -> torch.Tensor:
    """``layernorm``: each image token standardised over its channels (no learned scale), as a ViT's final LayerNorm
    leaves its features. Towers whose raw features are tiny (EfficientNet's final map: mean |x| ~ 0.1) otherwise
    reach the Q-Former's cross-attention as a faint signal: colour stayed linearly decodable from the queries but
    too weak for the frozen LLM to read."""
    if kind == "none":
        return image_embeds
    if kind == "layernorm":
        return torch.nn.functional.layer_norm(image_embeds.float(), image_embeds.shape[-1:]).to(image_embeds.dtype)
    raise ValueError(f"Unknown image feature normalisation {kind!r}; use one of {IMAGE_FEATURE_NORMS}.")


def run_qformer(qformer, query_tokens, image_embeds, text_embeddings=None, text=None, image_norm: str = "none"
                ) -> torch.Tensor:
    """(B, N, D) image features -> (B, Q, H) query outputs. With ``text_embeddings`` and tokenized ``text``
    (``input_ids``, ``attention_mask``), the text joins the queries in self-attention (bidirectional, padding
    hidden), as InstructBLIP's Q-Former does; only the Q query outputs are returned. Training and serving share
    this function."""
    image_embeds = normalize_image_features(image_embeds, image_norm)
    queries = query_tokens.expand(image_embeds.shape[0], -1, -1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    if text_embeddings is None:
        return qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                       return_dict=True).last_hidden_state
    device = queries.device
    input_ids, text_mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    hidden = text_embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q+T, H)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=device), text_mask], dim=1)
    out = qformer(query_embeds=hidden, query_length=queries.shape[1], attention_mask=mask,
                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True)
    return out.last_hidden_state[:, : queries.shape[1]]


class _CancelCriteria(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class TextStream:
    """Iterates text chunks as the model produces them. ``cancel()`` (or closing the iterator, or leaving the
    ``with`` block) stops generation at the next token. After iteration, ``reply`` holds the finished Reply.

    ``follow_up(reply)``, if given, runs in the same worker thread once the reply is done (the iterator has already
    ended by then): work for the *next* turn that nobody waits for. ``wait()`` waits for it too."""

    def __init__(self, start, streamer: TextIteratorStreamer | None, cancel: threading.Event, follow_up=None):
        self._cancel = cancel
        self._streamer = streamer
        self._result: dict = {}
        self._done = threading.Event()
        # On blip2's compute thread (see blip2.compute), which the interpreter waits for at exit rather than
        # killing it inside a torch kernel or the follow-up (that aborts the process: "terminate called without an
        # active exception"). Cancelled or consumed streams end within a token; an abandoned one finishes its reply.
        self._job = compute.submit(self._work, start, follow_up)

    def _work(self, start, follow_up):
        try:
            self._result["reply"] = start()
        except BaseException as exc:  # re-raised in the consumer's thread
            self._result["error"] = exc
            if self._streamer is not None:
                self._streamer.end()
        finally:
            self._done.set()
        if follow_up is not None and "reply" in self._result:
            _run_follow_up(follow_up, self._result["reply"])  # after the reply is handed over; wait() waits for it

    def __iter__(self) -> Iterator[str]:
        try:
            if self._streamer is not None:
                for chunk in self._streamer:
                    if chunk:
                        yield chunk
            self._done.wait()
            if "error" in self._result:
                raise self._result["error"]
            if self._streamer is None:  # beam search cannot stream: the whole text comes at the end
                yield self._result["reply"].text
        finally:
            self.cancel()
            self._done.wait()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self) -> Reply | None:
        """Wait until the worker is finished, follow-up work included; returns the reply."""
        self._job.result()
        return self.reply

    @property
    def reply(self) -> Reply | None:
        return self._result.get("reply")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        self._done.wait()


def _run_follow_up(follow_up, reply) -> None:
    try:
        follow_up(reply)
    except Exception:  # an optimisation for the next turn: never worth failing the finished one
        logger.warning("Preparing the next chat turn failed; it will be computed in full.", exc_info=True)


class Blip2(nn.Module):
    """A BLIP-2 model ready for inference. Build it with :func:`blip2.load`."""

    def __init__(
        self,
        vision: ImageEncoder,
        query_tokens: nn.Parameter,
        qformer: nn.Module,
        language_projection: nn.Module,
        language_model: nn.Module,
        tokenizer,
        *,
        image_token_id: int,
        prompt_format: PromptFormat,
        info: ModelInfo,
        qformer_embeddings: nn.Module | None = None,
        qformer_tokenizer=None,
        image_feature_norm: str = "none",
        query_cache_size: int = 32,
        prefix_cache_size: int = 4,
    ):
        super().__init__()
        self.vision = vision
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection
        self.language_model = language_model
        self.tokenizer = tokenizer
        # Instruction-aware Q-Former (paper Fig. 7, VQA fine-tuning): the user's text also enters the Q-Former, so the
        # queries extract what is asked. None for the official checkpoints and plain BLIP-2.
        self.qformer_embeddings = qformer_embeddings
        self.qformer_tokenizer = qformer_tokenizer
        self.image_feature_norm = image_feature_norm  # see normalize_image_features
        self.image_token_id = image_token_id
        self.prompt_format = prompt_format
        self.info = info
        self.is_encoder_decoder = bool(language_model.config.is_encoder_decoder)
        self._query_cache = _LRU(query_cache_size)  # image digest -> (1, Q, H_llm) on the LLM's device
        self._prefix_caches: list[tuple[str, list[int], DynamicCache]] = []
        self._prefix_cache_size = prefix_cache_size
        # reply text -> the ids generated for it. Not a cache of computation but what the model said: kept by
        # clear_caches() so a turn gets the same prompt ids whether its key/values are reused or recomputed.
        self._reply_ids = _LRU(256)
        self._lock = threading.RLock()

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def llm_input_device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def context_length(self) -> int | None:
        """Longest input the LLM takes (None when it has no fixed limit, e.g. T5's relative positions)."""
        config = self.language_model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None

    def clear_caches(self) -> None:
        """Forget cached image queries and key/value prefixes (e.g. to measure uncached latency)."""
        with self._lock:
            self._query_cache.clear()
            self._prefix_caches.clear()

    # -- image -> soft prompt --------------------------------------------------------------------------------
    @property
    def instruction_aware(self) -> bool:
        return self.qformer_embeddings is not None

    @compute.on_compute
    @torch.inference_mode()
    def query_embeddings(self, pixel_values: torch.Tensor, instruction: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, H_llm): the image as soft prompt vectors in the LLM's embedding space. An
        instruction-aware Q-Former also reads ``instruction`` (the user's text)."""
        pixel_values = pixel_values.to(self.vision.device, self.vision.dtype)
        image_embeds = self.vision(pixel_values)  # (B, N, D)
        text = None
        if self.instruction_aware:
            text = self.qformer_tokenizer([instruction or ""] * image_embeds.shape[0], padding="longest",
                                          truncation=True, max_length=QFORMER_TEXT_TOKENS, return_tensors="pt")
        query_output = run_qformer(self.qformer, self.query_tokens, image_embeds, self.qformer_embeddings, text,
                                   image_norm=self.image_feature_norm)
        # Same casts as transformers: back to the image features' dtype, then the projection's own dtype.
        if query_output.dtype != image_embeds.dtype:
            query_output = query_output.to(image_embeds.dtype)
        weight = self.language_projection.weight
        query_output = query_output.to(weight.device, weight.dtype if weight.is_floating_point() else query_output.dtype)
        return self.language_projection(query_output)

    def encode_image(self, image, instruction: str | None = None) -> tuple[str, torch.Tensor]:
        """Validate an image (path, bytes, PIL, numpy) and return (cache key, (1, Q, H_llm) query embeddings),
        cached by content (and, for an instruction-aware Q-Former, by the instruction) so a conversation about one
        picture runs the towers once."""
        return self._encode_loaded(load_image(image), instruction)

    @compute.on_compute
    def _encode_loaded(self, pil, instruction: str | None) -> tuple[str, torch.Tensor]:
        key = image_digest(pil)
        if self.instruction_aware:  # the soft prompt depends on the text too: key caches (and KV prefixes) by both
            key += ":" + hashlib.sha256((instruction or "").encode()).hexdigest()[:16]
        with self._lock:
            cached = self._query_cache.get(key)
            if cached is None:
                pixel_values = self.vision.preprocess([pil])
                cached = self.query_embeddings(pixel_values, instruction).to(self.llm_input_device)
                self._query_cache.put(key, cached)
            else:
                self._query_cache.move_to_end(key)
        return key, cached

    # -- public API ------------------------------------------------------------------------------------------
    def generate(self, image, prompt: str | None = None, **decoding) -> str:
        """Text for an image and a prompt. Plain-layout LLMs (OPT, Flan-T5) get the prompt verbatim, exactly as
        ``Blip2ForConditionalGeneration`` would; chat LLMs get it as the user's message."""
        return self.generate_reply(image, prompt, **decoding).text

    def generate_reply(self, image, prompt: str | None = None, **decoding) -> Reply:
        """Like :meth:`generate`, returning the :class:`Reply` (token ids, counts, timings). Runs in the calling
        thread with no streamer: the plain path for batch jobs and benchmarks."""
        return self._generate_ids(*self._prepare(image, self._raw(prompt), 0, lambda _: prompt or "", decoding), None,
                                  threading.Event())

    def stream(self, image, prompt: str | None = None, **decoding) -> TextStream:
        return self._start(image, self._raw(prompt), 0, lambda _: prompt or "", decoding)

    def _raw(self, prompt: str | None):
        return lambda drop, cut: self.prompt_format.raw(_cut(prompt or "", cut), self.tokenizer)

    def caption(self, image, **decoding) -> str:
        return self.generate(image, self.prompt_format.caption_prompt, **decoding)

    def ask(self, image, question: str, **decoding) -> str:
        return self.chat(image, [], question, **decoding)

    def chat(self, image, history: Sequence, message: str, *, stream: bool = False, **decoding):
        """Reply to ``message`` about ``image`` after earlier ``history`` turns (pairs of (user, assistant) text,
        or role/content dicts). Returns the reply text, or a :class:`TextStream` with ``stream=True``.

        An instruction-aware Q-Former reads the user message of the turn the image sits in (the first turn kept in
        the prompt), as in training; so every turn of a conversation shows the LLM the same soft prompt, and the
        key/values of the earlier turns stay valid for the next one."""
        turns = _as_turns(history)

        def render(drop: int, cut: int) -> Rendered:
            return self.prompt_format.conversation(
                turns[drop:], _cut(message, cut), self.tokenizer, mark_replies=self._can_reuse_replies
            )

        def instruction(dropped: int) -> str:
            return turns[dropped][0] if dropped < len(turns) else message

        if stream:  # chat front ends stream; the next turn is prepared in the stream's worker once the reply is out
            return self._start(image, render, len(turns), instruction, decoding, self._next_turn_prefill(turns, message))
        # Without a stream (batch jobs, ask(), evaluation) nobody is reading while we could prefill: no follow-up.
        return self._generate_ids(*self._prepare(image, render, len(turns), instruction, decoding), None,
                                  threading.Event()).text

    # -- internals -------------------------------------------------------------------------------------------
    def _prepare(self, image, render, num_turns: int, instruction, decoding: dict) -> tuple:
        """Validate settings and image, render and fit the prompt, encode the image (cached): every error surfaces
        here, in the caller's thread, before any generation starts. ``instruction(dropped)`` is the text an
        instruction-aware Q-Former reads once ``dropped`` turns were dropped to fit (``num_turns``: the message)."""
        settings = Decoding.from_kwargs(**decoding)
        t0 = time.perf_counter()
        pil = load_image(image)
        ids, dropped, cut = self._fit(render, num_turns, instruction(num_turns), settings)
        # The text matters only to an instruction-aware Q-Former.
        digest, queries = self._encode_loaded(pil, instruction(dropped))
        return digest, queries, ids, settings, t0, dropped, cut

    def _start(self, image, render, num_turns: int, instruction, decoding: dict, follow_up=None) -> TextStream:
        prepared = self._prepare(image, render, num_turns, instruction, decoding)
        settings = prepared[3]
        cancel = threading.Event()
        streamer = None
        if settings.num_beams == 1:
            # skip_prompt drops the first chunk generate emits: the prompt (or the decoder start token).
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
        follow_up = partial(follow_up, prepared[0]) if follow_up is not None else None  # with the image digest
        return TextStream(lambda: self._generate_ids(*prepared, streamer, cancel), streamer, cancel, follow_up)

    @property
    def _can_reuse_replies(self) -> bool:
        # Decoder-only LLMs: their replies continue the prompt, so the generated ids can be fed back verbatim.
        return not self.is_encoder_decoder

    def _tokenize(self, rendered: Rendered) -> list[int]:
        return prompt_ids(rendered, self.tokenizer, self.image_token_id, self.num_query_tokens, self._reply_ids.get)

    def _remember_reply(self, text: str, new_tokens: list[int]) -> None:
        """Keep the ids this model generated for ``text``, so a later turn quoting the reply feeds them back
        (see ``prompt_ids``); trailing special tokens (EOS) are left to the prompt template."""
        special = set(self.tokenizer.all_special_ids)
        while new_tokens and new_tokens[-1] in special:
            new_tokens = new_tokens[:-1]
        # ``text`` is these ids decoded with special tokens skipped, so the trailing ones dropped here change nothing.
        if text and new_tokens:
            self._reply_ids.put(text, new_tokens)

    def _fit(self, render, num_turns: int, message: str, settings: Decoding) -> tuple[list[int], int, int]:
        """Render and tokenize, dropping the oldest turns, then cutting the message, until prompt + reply fit."""
        limit = self.context_length
        ids = self._tokenize(render(0, 0))
        if limit is None or len(ids) + settings.max_new_tokens <= limit:
            return ids, 0, 0
        for drop in range(1, num_turns + 1):
            ids = self._tokenize(render(drop, 0))
            if len(ids) + settings.max_new_tokens <= limit:
                return ids, drop, 0
        # Still too long: cut the message's tail, a character budget found by bisection on the real token count.
        low, high = 0, len(message)
        while low < high:
            keep = (low + high + 1) // 2
            if len(self._tokenize(render(num_turns, len(message) - keep))) + settings.max_new_tokens <= limit:
                low = keep
            else:
                high = keep - 1
        ids = self._tokenize(render(num_turns, len(message) - low))
        if len(ids) + settings.max_new_tokens > limit:
            raise PromptTooLongError(
                f"The prompt needs {len(ids)} tokens and the reply {settings.max_new_tokens}, but this model takes "
                f"{limit}. Lower max_new_tokens."
            )
        return ids, num_turns, len(message) - low

    def _reusable_cache(self, digest: str, ids: list[int]) -> tuple[DynamicCache | None, int]:
        """Take the cached key/values that share the longest prefix with ``ids`` (same image), cropped to it."""
        best, best_len = None, 0
        for index, (entry_digest, entry_ids, _) in enumerate(self._prefix_caches):
            if entry_digest != digest:
                continue
            common = _common_prefix(entry_ids, ids)
            if common > best_len:
                best, best_len = index, common
        # Keep at least one position to prefill: generate needs new input to produce the next token's logits.
        best_len = min(best_len, len(ids) - 1)
        if best is None or best_len <= self.num_query_tokens:
            return None, 0
        _, entry_ids, cache = self._prefix_caches.pop(best)
        if cache.get_seq_length() > best_len:
            cache.crop(best_len - cache.get_seq_length())
        return cache, best_len

    def _can_reuse_prefix(self, settings: Decoding) -> bool:
        return not self.is_encoder_decoder and settings.num_beams == 1

    @compute.on_compute
    @torch.inference_mode()
    def _generate_ids(self, digest, queries, ids, settings, t0, dropped, cut, streamer, cancel) -> Reply:
        device = self.llm_input_device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        kwargs = settings.generate_kwargs()
        kwargs["stopping_criteria"] = StoppingCriteriaList([_CancelCriteria(cancel)])
        # Beam search cannot stream in transformers; its first token time is then the whole generation.
        timer = _FirstTokenTimer(streamer) if settings.num_beams == 1 else None
        with self._lock:
            cache, reused = (None, 0)
            if self._can_reuse_prefix(settings):
                cache, reused = self._reusable_cache(digest, ids)
                if cache is None:
                    cache = DynamicCache(config=self.language_model.config)
            embeds = self.language_model.get_input_embeddings()(input_ids)
            image_positions = input_ids == self.image_token_id
            # generate reads only the positions after the cached prefix; when the image lies inside it, the
            # soft prompt is already in the key/values and need not be placed again.
            if bool(image_positions[:, reused:].any()):
                embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), queries.to(device, embeds.dtype))
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            if self.is_encoder_decoder:
                out = self.language_model.generate(
                    inputs_embeds=embeds, attention_mask=attention_mask, streamer=timer, **kwargs
                )
                new_tokens = out[0]
                if new_tokens.numel() and new_tokens[0] == self.language_model.config.decoder_start_token_id:
                    new_tokens = new_tokens[1:]
            else:
                extra = {"cache": cache, "return_dict_in_generate": True} if cache is not None else {}
                out = self.language_model.generate(
                    input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                    streamer=timer, **extra, **kwargs,
                )
                sequences = out.sequences if extra else out
                new_tokens = sequences[0, input_ids.shape[1]:]
                if extra and _is_plain_dynamic(out.cache):
                    self._remember_prefix(digest, sequences[0].tolist(), out.cache)
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        token_ids = new_tokens.tolist()
        if self._can_reuse_replies:
            self._remember_reply(text, token_ids)
        return Reply(
            text=text,
            token_ids=token_ids,
            prompt_tokens=len(ids),
            new_tokens=int(new_tokens.numel()),
            seconds=time.perf_counter() - t0,
            first_token_seconds=(timer.first_at - t0) if timer and timer.first_at else None,
            reused_prefix_tokens=reused,
            dropped_turns=dropped,
            truncated_message=cut > 0,
            cancelled=cancel.is_set(),
        )

    def _next_turn_prefill(self, turns: list[Turn], message: str):
        """A follow-up for a chat turn: once the reply is done, run the LLM over the part of the *next* turn's
        prompt that does not depend on the next message (the reply's last token, the end-of-turn and next-user
        markup), extending the cached key/values, so the next turn prefills only its own question. It is found
        by rendering the next turn with two different placeholder messages and keeping their common token
        prefix; the next turn reuses it only where its real ids match (``_reusable_cache``), so a wrong guess
        costs a few tokens of work, never a wrong answer. None where the prefix cannot be reused."""
        if not self._can_reuse_replies:
            return None

        def prefill(digest: str, reply: Reply) -> None:
            if reply.cancelled or reply.truncated_message or not reply.text:
                return
            history = turns[reply.dropped_turns:] + [(message, reply.text)]
            a, b = (
                self._tokenize(self.prompt_format.conversation(history, x, self.tokenizer, mark_replies=True))
                for x in ("A", "B")
            )
            self._extend_prefix(digest, a[: _common_prefix(a, b)])

        return prefill

    @compute.on_compute
    @torch.inference_mode()
    def _extend_prefix(self, digest: str, ids: list[int]) -> None:
        with self._lock:
            for index in reversed(range(len(self._prefix_caches))):
                entry_digest, entry_ids, cache = self._prefix_caches[index]
                if entry_digest == digest and len(entry_ids) < len(ids) and ids[: len(entry_ids)] == entry_ids:
                    break
            else:
                return
            new = ids[len(entry_ids):]
            if self.image_token_id in new:
                return
            device = self.llm_input_device
            self.language_model(
                input_ids=torch.tensor([new], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                cache=cache, use_cache=True, logits_to_keep=1,
            )
            self._prefix_caches[index] = (digest, ids, cache)

    def _remember_prefix(self, digest: str, sequence: list[int], cache: DynamicCache) -> None:
        length = cache.get_seq_length()  # the last generated token is not in the cache yet
        self._prefix_caches.append((digest, sequence[:length], cache))
        del self._prefix_caches[: -self._prefix_cache_size]


class _FirstTokenTimer:
    """Streamer wrapper that records when the first generated token arrives (time to first token)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.first_at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_at is None:  # call 1 is the prompt / decoder start
            self.first_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.first_at is None and self.calls:
            self.first_at = time.perf_counter()
        if self.inner is not None:
            self.inner.end()


def _is_plain_dynamic(cache) -> bool:
    """Only full-attention dynamic layers can be cropped to a prefix and extended again safely."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cut(text: str, remove: int) -> str:
    return text[: len(text) - remove] if remove else text


def _as_turns(history: Sequence) -> list[Turn]:
    """Accept [(user, assistant), ...] or [{"role": ..., "content": ...}, ...] (the Gradio messages format)."""
    turns: list[Turn] = []
    pending_user: str | None = None
    for item in history:
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if not isinstance(content, str):
                continue  # images or files in a messages list carry no text for the LLM
            if role == "user":
                pending_user = content if pending_user is None else f"{pending_user}\n{content}"
            elif role == "assistant" and pending_user is not None:
                turns.append((pending_user, content))
                pending_user = None
        else:
            user, assistant = item
            turns.append((str(user), str(assistant)))
    return turns
