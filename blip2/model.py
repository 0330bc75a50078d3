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

Those parts live in their own modules: :mod:`blip2.caches`, :mod:`blip2.streaming`, :mod:`blip2.conversation` (chat
history and context fitting) and :mod:`blip2.qformer` (the Q-Former pass training shares).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import StoppingCriteriaList, TextIteratorStreamer
from transformers.cache_utils import DynamicCache

from . import compute
from .caches import LRU, PrefixCache, common_prefix, is_plain_dynamic
from .conversation import cut, fit_prompt, known_reply_ids, split_history
from .decoding import Decoding
from .encoders import ImageEncoder
from .images import image_digest, load_image
from .prompts import PromptFormat, Rendered, Turn, prompt_ids
from .qformer import QFORMER_TEXT_TOKENS, run_qformer
from .streaming import CancelCriteria, FirstTokenTimer, TextStream


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
    # The generated tokens (special tokens included). Pass them back with the reply in the next chat call's history
    # ((user, text, token_ids)): the next prompt then holds exactly what the model generated, see Blip2.chat.
    token_ids: list[int]
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
        self.image_feature_norm = image_feature_norm  # see blip2.qformer.normalize_image_features
        self.image_token_id = image_token_id
        self.prompt_format = prompt_format
        self.info = info
        self.is_encoder_decoder = bool(language_model.config.is_encoder_decoder)
        self._query_cache = LRU(query_cache_size)  # image digest -> (1, Q, H_llm) on the LLM's device
        self._prefix_cache = PrefixCache(prefix_cache_size)
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
            self._prefix_cache.clear()

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

    def _raw(self, prompt: str | None) -> Callable[[int, int], list[int]]:
        return lambda drop, chars: self._tokenize(self.prompt_format.raw(cut(prompt or "", chars), self.tokenizer))

    def caption(self, image, **decoding) -> str:
        return self.generate(image, self.prompt_format.caption_prompt, **decoding)

    def ask(self, image, question: str, **decoding) -> str:
        return self.chat(image, [], question, **decoding)

    def chat(self, image, history: Sequence, message: str, *, stream: bool = False, **decoding):
        """Reply to ``message`` about ``image`` after earlier ``history`` turns. Returns the reply text, or a
        :class:`TextStream` with ``stream=True``.

        ``history`` items are ``(user, assistant)`` pairs, ``(user, assistant, assistant_token_ids)`` triples, or
        role/content dicts (an assistant dict may carry ``"token_ids"``). Pass each reply's ``Reply.token_ids``
        along: a model often generates a tokenization that re-tokenizing its text does not give back, and with its
        own ids the next prompt extends the last one exactly, so that turn's key/values are reused whole. Only this
        call's history is consulted, and only ids that decode to their reply's text (else the text is tokenized):
        a conversation's prompt never depends on other conversations.

        An instruction-aware Q-Former reads the user message of the turn the image sits in (the first turn kept in
        the prompt), as in training; so every turn of a conversation shows the LLM the same soft prompt, and the
        key/values of the earlier turns stay valid for the next one."""
        turns, ids_given = split_history(history)
        reply_ids = {}
        if self._can_reuse_replies:
            reply_ids = known_reply_ids(zip((reply for _, reply in turns), ids_given), self.tokenizer)

        def prompt(drop: int, chars: int) -> list[int]:
            rendered = self.prompt_format.conversation(
                turns[drop:], cut(message, chars), self.tokenizer, mark_replies=self._can_reuse_replies
            )
            return self._tokenize(rendered, reply_ids)

        def instruction(dropped: int) -> str:
            return turns[dropped][0] if dropped < len(turns) else message

        if stream:  # chat front ends stream; the next turn is prepared in the stream's worker once the reply is out
            follow_up = self._next_turn_prefill(turns, message, reply_ids)
            return self._start(image, prompt, len(turns), instruction, decoding, follow_up)
        # Without a stream (batch jobs, ask(), evaluation) nobody is reading while we could prefill: no follow-up.
        return self._generate_ids(*self._prepare(image, prompt, len(turns), instruction, decoding), None,
                                  threading.Event()).text

    # -- internals -------------------------------------------------------------------------------------------
    def _prepare(self, image, prompt, num_turns: int, instruction, decoding: dict) -> tuple:
        """Validate settings and image, tokenize and fit the prompt, encode the image (cached): every error surfaces
        here, in the caller's thread, before any generation starts. ``prompt(drop, cut)`` is the prompt's ids with
        the ``drop`` oldest turns left out and ``cut`` characters cut from the message's end (``num_turns``: how
        many can be dropped); ``instruction(dropped)`` is the text an instruction-aware Q-Former reads once
        ``dropped`` turns were dropped to fit (``num_turns``: the message)."""
        settings = Decoding.from_kwargs(**decoding)
        t0 = time.perf_counter()
        pil = load_image(image)
        ids, dropped, chars_cut = fit_prompt(prompt, num_turns, instruction(num_turns), self.context_length,
                                             settings.max_new_tokens)
        # The text matters only to an instruction-aware Q-Former.
        digest, queries = self._encode_loaded(pil, instruction(dropped))
        return digest, queries, ids, settings, t0, dropped, chars_cut

    def _start(self, image, prompt, num_turns: int, instruction, decoding: dict, follow_up=None) -> TextStream:
        prepared = self._prepare(image, prompt, num_turns, instruction, decoding)
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

    def _tokenize(self, rendered: Rendered, reply_ids: dict[str, list[int]] | None = None) -> list[int]:
        """The prompt's ids; marked replies found in ``reply_ids`` (see ``known_reply_ids``) go in as those ids."""
        return prompt_ids(rendered, self.tokenizer, self.image_token_id, self.num_query_tokens,
                          reply_ids.get if reply_ids else None)

    def _can_reuse_prefix(self, settings: Decoding) -> bool:
        return not self.is_encoder_decoder and settings.num_beams == 1

    @compute.on_compute
    @torch.inference_mode()
    def _generate_ids(self, digest, queries, ids, settings, t0, dropped, chars_cut, streamer, cancel) -> Reply:
        device = self.llm_input_device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        kwargs = settings.generate_kwargs()
        kwargs["stopping_criteria"] = StoppingCriteriaList([CancelCriteria(cancel)])
        # Beam search cannot stream in transformers; its first token time is then the whole generation.
        timer = FirstTokenTimer(streamer) if settings.num_beams == 1 else None
        with self._lock:
            cache, reused = (None, 0)
            if self._can_reuse_prefix(settings):
                # Reusing less than the image slot saves nothing.
                cache, reused = self._prefix_cache.take(digest, ids, more_than=self.num_query_tokens)
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
                if extra and is_plain_dynamic(out.cache):
                    self._prefix_cache.put(digest, sequences[0].tolist(), out.cache)
        return Reply(
            text=self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
            token_ids=new_tokens.tolist(),
            prompt_tokens=len(ids),
            new_tokens=int(new_tokens.numel()),
            seconds=time.perf_counter() - t0,
            first_token_seconds=(timer.first_at - t0) if timer and timer.first_at else None,
            reused_prefix_tokens=reused,
            dropped_turns=dropped,
            truncated_message=chars_cut > 0,
            cancelled=cancel.is_set(),
        )

    def _next_turn_prefill(self, turns: list[Turn], message: str, reply_ids: dict[str, list[int]]):
        """A follow-up for a chat turn: once the reply is done, run the LLM over the part of the *next* turn's
        prompt that does not depend on the next message (the reply's last token, the end-of-turn and next-user
        markup), extending the cached key/values, so the next turn prefills only its own question. It is found
        by rendering the next turn with two different placeholder messages and keeping their common token
        prefix; the next turn reuses it only where its real ids match (``PrefixCache.take``), so a wrong guess
        costs a few tokens of work, never a wrong answer. None where the prefix cannot be reused.

        The next turn's history is this one's plus the reply with its ids, as a caller passes them back."""
        if not self._can_reuse_replies:
            return None

        def prefill(digest: str, reply: Reply) -> None:
            if reply.cancelled or reply.truncated_message or not reply.text:
                return
            history = turns[reply.dropped_turns:] + [(message, reply.text)]
            known = {**reply_ids, **known_reply_ids([(reply.text, reply.token_ids)], self.tokenizer)}
            a, b = (
                self._tokenize(self.prompt_format.conversation(history, x, self.tokenizer, mark_replies=True), known)
                for x in ("A", "B")
            )
            self._extend_prefix(digest, a[: common_prefix(a, b)])

        return prefill

    @compute.on_compute
    @torch.inference_mode()
    def _extend_prefix(self, digest: str, ids: list[int]) -> None:
        with self._lock:
            entry = self._prefix_cache.extendable(digest, ids)
            if entry is None:
                return
            new = ids[len(entry.ids):]
            if self.image_token_id in new:
                return
            device = self.llm_input_device
            self.language_model(
                input_ids=torch.tensor([new], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                cache=entry.cache, use_cache=True, logits_to_keep=1,
            )
            entry.ids = ids
