"""Image-text pairs for stage-1 training: datasets, augmentation and collation.

Every dataset yields items ``{"image": PIL RGB, "text": str, "id": str, "source": str}`` (some add ``"qa"``,
``"flip_ok"``, ``"crop_ok"``). Sources:

- ``ManifestDataset(path)``      JSONL or CSV of ``image,caption`` (paths relative to the manifest's folder)
- ``WebDatasetShards(shards)``   img2dataset tar shards, streamed (split across DataLoader workers and ranks)
- ``TuxPaintStamps(split=...)``  Debian ``tuxpaint-stamps-default``: stamp PNG + first line of its .txt
- ``EasyVQA(split)``             easy-vqa images with a caption derived from their QA; ``EasyVQAQuestions(split)``
- ``Scenes(n, seed)``            procedural shapes (drawn by ``scene_maker``)
- ``ConcatPairs([...])``         several map-style datasets as one

Modules: ``pairs`` (the item contract: ``Skipped``, ``PairDataset``, ``ConcatPairs``), one per source
(``manifest``, ``webdataset``, ``tuxpaint``, ``easyvqa``, ``scenes``), ``augment`` and ``collate``; the package
re-exports their public names.

Bad data is skipped and counted, never fatal. Map-style datasets drop what they can see cheaply when they are
built (missing files, empty captions, SVG-only stamps) and count it in ``dataset.skipped`` (a ``Counter`` by
reason). Images are decoded only when fetched, with ``blip2.images.load_image``; an image that fails to decode
makes ``__getitem__`` return a :class:`Skipped` marker instead of an item. ``collate_pairs`` drops markers and
reports them in the batch's ``"skipped"`` Counter, so the counts reach the main process even from DataLoader
workers (a worker's own ``dataset.skipped`` lives in the worker). We chose this over decoding everything up front:
a pre-scan of a large set costs as much as an epoch. ``WebDatasetShards`` skips inline and yields a
``Skipped`` marker too, for the same reason.

Augmentation (:func:`train_transform`) is the paper's random resized crop (scale 0.5-1) + horizontal flip. A flip
turns "on the left" into a lie, so flipping swaps left and right in the text (:func:`swap_left_right`), and items
marked ``flip_ok=False`` (stamps whose .dat says ``nomirror``: coins, road signs with writing) are never flipped.
Items marked ``crop_ok=False`` (scenes: a crop could cut a counted shape out) are only resized.
"""

from .augment import PairTransform, has_left_right, swap_left_right, train_transform
from .collate import collate_pairs, replace_broken
from .easyvqa import EasyVQA, EasyVQAQuestions, easy_vqa_facts
from .manifest import ManifestDataset
from .pairs import ConcatPairs, PairDataset, Skipped, clean_text, held_out, iter_items
from .scenes import Scenes, scene_seed
from .tuxpaint import TUXPAINT_STAMPS, TuxPaintStamps, stamp_caption
from .webdataset import IMAGE_EXTENSIONS, WebDatasetShards, expand_shards

__all__ = [
    "IMAGE_EXTENSIONS",
    "TUXPAINT_STAMPS",
    "ConcatPairs",
    "EasyVQA",
    "EasyVQAQuestions",
    "ManifestDataset",
    "PairDataset",
    "PairTransform",
    "Scenes",
    "Skipped",
    "TuxPaintStamps",
    "WebDatasetShards",
    "clean_text",
    "collate_pairs",
    "replace_broken",
    "easy_vqa_facts",
    "expand_shards",
    "has_left_right",
    "held_out",
    "iter_items",
    "scene_seed",
    "stamp_caption",
    "swap_left_right",
    "train_transform",
]
