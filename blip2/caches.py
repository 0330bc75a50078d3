"""What :class:`blip2.Blip2` keeps between calls to avoid recomputing it: projected image queries (an LRU keyed by
image content) and the key/value caches of recent prompts, which a later chat turn crops to the prefix it shares
and extends. Neither is thread-safe: the model's lock guards both."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from transformers.cache_utils import DynamicCache, DynamicLayer


class LRU(OrderedDict):
    """A dict that forgets its least recently put (or ``move_to_end``-ed) entries beyond ``capacity``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class CachedPrefix:
    digest: str  # the image (and instruction) the soft prompt inside these key/values came from
    ids: list[int]  # the token ids the key/values cover, one per cached position
    cache: DynamicCache


class PrefixCache:
    """Key/values of the last ``capacity`` generations (prompt + reply), so a chat turn whose prompt extends an
    earlier one prefills only what it added."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: list[CachedPrefix] = []

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def put(self, digest: str, sequence: list[int], cache: DynamicCache) -> None:
        """Keep ``cache``, computed for ``sequence`` (its leading positions: a generation's last token is not in
        the cache yet); the oldest entry beyond ``capacity`` is dropped."""
        self._entries.append(CachedPrefix(digest, sequence[: cache.get_seq_length()], cache))
        del self._entries[: -self.capacity]

    def take(self, digest: str, ids: list[int], more_than: int) -> tuple[DynamicCache | None, int]:
        """Remove the entry for ``digest`` that shares the longest prefix with ``ids`` and return its cache cropped
        to that prefix, with the prefix length; (None, 0) unless the prefix is longer than ``more_than`` positions
        (the image slot: reusing less saves nothing)."""
        best, best_len = None, 0
        for index, entry in enumerate(self._entries):
            if entry.digest != digest:
                continue
            common = common_prefix(entry.ids, ids)
            if common > best_len:
                best, best_len = index, common
        # Keep at least one position to prefill: generate needs new input to produce the next token's logits.
        best_len = min(best_len, len(ids) - 1)
        if best is None or best_len <= more_than:
            return None, 0
        cache = self._entries.pop(best).cache
        if cache.get_seq_length() > best_len:
            cache.crop(best_len - cache.get_seq_length())
        return cache, best_len

    def extendable(self, digest: str, ids: list[int]) -> CachedPrefix | None:
        """The newest entry for ``digest`` whose ids are a proper prefix of ``ids``: running the model over the
        rest of ``ids`` with its cache, then setting its ``ids``, extends it in place."""
        for entry in reversed(self._entries):
            if entry.digest == digest and len(entry.ids) < len(ids) and ids[: len(entry.ids)] == entry.ids:
                return entry
        return None


def is_plain_dynamic(cache) -> bool:
    """Only full-attention dynamic layers can be cropped to a prefix and extended again safely."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
