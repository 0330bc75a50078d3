"""training/ data: procedural scenes, pair datasets, augmentation, collation and the feature cache.

Everything runs on tiny files made in tmp_path; the real Tux Paint / easy-vqa checks run when those are installed
(`apt-get install tuxpaint-stamps-default`, `pip install --no-deps easy-vqa==1.0`) and skip with the reason
otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as D
from training.data.scene_maker import COLORS, SHAPES, make_scene, number_word

# ---------------------------------------------------------------------------------------------------------------
# Scenes


def test_scene_is_reproducible_and_seeds_differ():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.caption, a.qa, a.objects) == (b.caption, b.qa, b.objects)
    assert a.image.tobytes() != c.image.tobytes()
    assert len({make_scene(s).caption for s in range(40)}) > 30
    assert make_scene(3, size=96).image.size == (96, 96)


def _parse_caption_counts(caption: str) -> Counter:
    """{(colour, shape): count} stated by a caption."""
    counts = Counter()
    words = "|".join(["a", "an"] + [number_word(n) for n in range(2, 5)])
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    for m in re.finditer(rf"\b({words}) (?:small |large )?({colors}) ({shapes})s?\b", caption.lower()):
        n = 1 if m.group(1) in ("a", "an") else [number_word(k) for k in range(5)].index(m.group(1))
        counts[(m.group(2), m.group(3))] += n
    return counts


def _check_scene_pixels(scene):
    """Every object is drawn in its exact colour inside its bbox, and no shape colour appears anywhere else."""
    pixels = np.asarray(scene.image)
    for color, rgb in COLORS.items():
        mask = np.all(pixels == rgb, axis=-1)
        inside = np.zeros_like(mask)
        for obj in scene.objects:
            if obj.color != color:
                continue
            x0, y0, x1, y1 = obj.bbox
            box = mask[y0:y1 + 1, x0:x1 + 1]
            assert box.mean() > 0.3, (scene.seed, obj)  # a star fills ~40% of its box, a square 100%
            cx, cy = obj.center
            assert mask[cy, cx], (scene.seed, obj)  # every shape covers its centre
            inside[y0:y1 + 1, x0:x1 + 1] = True
        assert not (mask & ~inside).any(), (scene.seed, color)


def _true_answer(scene, question: str) -> str | None:
    """Answer ``question`` from the objects list, independently of the generator's code."""
    objs = scene.objects
    q = question.rstrip("?")
    if m := re.fullmatch(r"How many (\w+) shapes are there", q):
        return number_word(sum(o.color == m.group(1) for o in objs))
    if q == "How many shapes are there":
        return number_word(len(objs))
    if m := re.fullmatch(r"How many (\w+)s are there", q):
        return number_word(sum(o.shape == m.group(1) for o in objs))
    if m := re.fullmatch(r"What color is the (\w+)", q):
        (obj,) = [o for o in objs if o.shape == m.group(1)]
        return obj.color
    if m := re.fullmatch(r"What shape is (?:on|at|in) the ([\w ]+)", q):
        (obj,) = [o for o in objs if o.position == m.group(1)]
        return obj.shape
    if m := re.fullmatch(r"What shape is (\w+)", q):
        (obj,) = [o for o in objs if o.color == m.group(1)]
        return obj.shape
    if m := re.fullmatch(r"Where is the (\w+) (\w+)", q):
        (obj,) = [o for o in objs if (o.color, o.shape) == m.groups()]
        return obj.position
    if m := re.fullmatch(r"Is the (\w+) (\w+) small or large", q):
        (obj,) = [o for o in objs if (o.color, o.shape) == m.groups()]
        return obj.size
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)", q):
        (a,) = [o for o in objs if (o.color, o.shape) == m.group(1, 2)]
        (b,) = [o for o in objs if (o.color, o.shape) == m.group(4, 5)]
        if m.group(3) == "left of":
            return "yes" if a.center[0] < b.center[0] else "no"
        return "yes" if a.center[1] < b.center[1] else "no"
    if m := re.fullmatch(r"Is there a (\w+) (\w+)", q):
        return "yes" if any((o.color, o.shape) == m.groups() for o in objs) else "no"
    return None


def test_scene_answers_caption_and_pixels_are_true():
    kinds = Counter()
    for seed in range(150):
        scene = make_scene(seed, size=128)
        _check_scene_pixels(scene)
        assert _parse_caption_counts(scene.caption) == Counter((o.color, o.shape) for o in scene.objects), (
            scene.caption, scene.objects)
        for question, answer in scene.qa:
            truth = _true_answer(scene, question)
            assert truth is not None, f"unchecked question form: {question}"
            assert answer == truth, (seed, question, answer, truth)
            kinds[question.split()[0] + ("-" + answer if answer in ("yes", "no") else "")] += 1
    # All question families occur, and yes/no questions are not all "yes".
    assert {"How", "What", "Where", "Is-yes", "Is-no"} <= set(kinds), kinds


# ---------------------------------------------------------------------------------------------------------------
# Manifests, tar shards, skip counting


def _png(path, color=(200, 30, 30), size=(16, 12)):
    Image.new("RGB", size, color).save(path)
    return path


def _jpeg_bytes(color, size=(10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_manifest_jsonl_and_csv_skip_and_count(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    absolute = _png(tmp_path / "abs.png")
    lines = [
        {"image": "img/a.png", "caption": " A red  square. "},
        {"image": str(absolute), "text": "absolute path", "id": "custom-id"},
        {"image": "img/b.png", "caption": ""},  # empty caption
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/broken.png", "caption": "a broken file"},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n")
    ds = D.ManifestDataset(manifest)
    assert len(ds) == 3
    assert ds.skipped == Counter(empty_caption=1, missing_file=1, bad_record=1)
    first = ds[0]
    assert first["text"] == "A red square." and first["image"].mode == "RGB" and first["id"] == "pairs:1"
    assert ds[1]["id"] == "custom-id"
    broken = ds[2]
    assert isinstance(broken, D.Skipped) and broken.reason == "broken_image"
    assert ds.skipped["broken_image"] == 1

    batch = D.collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["texts"] == ["A red square.", "absolute path"] and batch["skipped"] == Counter(broken_image=1)

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('image,caption\nimg/a.png,"a red square, small"\nimg/b.png,\nimg/b.png,blue\n')
    ds = D.ManifestDataset(csv_path)
    assert [ds[i]["text"] for i in range(len(ds))] == ["a red square, small", "blue"]
    assert ds.skipped == Counter(empty_caption=1)


def _make_shards(folder, n_shards, per_shard):
    """img2dataset layout: 00000.tar with 000000001.jpg/.txt/.json."""
    paths, n = [], 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                key = f"{n:09d}"
                files = {f"{key}.jpg": _jpeg_bytes((n * 7 % 255, 50, 90)), f"{key}.txt": f"caption {n}".encode(),
                         f"{key}.json": json.dumps({"key": key, "caption": f"caption {n}"}).encode()}
                for name, payload in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                n += 1
        paths.append(str(path))
    return paths, n


@pytest.mark.parametrize("n_shards", [5, 2])  # 5 >= 4 slots: split by shard; 2 < 4: split by sample
def test_tar_shards_split_across_ranks_and_workers(tmp_path, n_shards):
    paths, total = _make_shards(tmp_path, n_shards, per_shard=7)
    seen = []
    for rank in range(2):
        ds = D.WebDatasetShards(f"{tmp_path}/{{00000..{n_shards - 1:05d}}}.tar", rank=rank, world_size=2)
        assert ds.shards == paths
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=D.collate_pairs)
        for batch in loader:
            seen.extend(batch["ids"])
            assert all(t.startswith("caption ") for t in batch["texts"])
    assert len(seen) == total and len(set(seen)) == total
    # Without workers or ranks one process sees everything, in order.
    ids = [it["id"] for it in D.iter_items(D.WebDatasetShards(paths, rank=0, world_size=1))]
    assert ids == [f"{s:05d}/{n:09d}" for s in range(n_shards) for n in range(s * 7, s * 7 + 7)]


def test_tar_shards_skip_broken_and_uncaptioned(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in [("1.jpg", _jpeg_bytes((1, 2, 3))), ("1.txt", b"good"),
                              ("2.jpg", b"\xff\xd8\xff broken"), ("2.txt", b"bad image"),
                              ("3.jpg", _jpeg_bytes((4, 5, 6))), ("3.txt", b"   "),
                              ("4.jpg", _jpeg_bytes((4, 5, 6))), ("4.json", b'{"caption": "from json"}'),
                              ("5.txt", b"no image")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    truncated = tmp_path / "00001.tar"
    truncated.write_bytes(path.read_bytes()[:700])
    ds = D.WebDatasetShards([str(path), str(truncated)], rank=0, world_size=1)
    batch = D.collate_pairs(list(ds))
    assert batch["texts"] == ["good", "from json"]
    assert batch["skipped"]["broken_image"] == 2 and batch["skipped"]["empty_caption"] == 1
    assert batch["skipped"]["no_image"] == 1
    assert ds.skipped["bad_shard"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Tux Paint stamps


STAMP_TXT = {
    "animals/birds/blackbird": "A blackbird.\nach.utf8=Winyo ma col.\nde.utf8=Eine Amsel.\n",
    "symbols/money/us/coins/100sacagawea": "A US \u201cSacagawea\u201d dollar ($1.00).\nfr.utf8=Une pi\u00e8ce.\n",
    "space/planets/4_mars": "Mars\u2014the red planet. It\u2019s just beyond earth.\r\nde.utf8=Mars.\r\n",
    "sports/cartoon/helmet": "\u2013 Because a brain is a terrible thing to waste\u2026\n",
    "odd/translations_first": "\ufeff\n\nde.utf8=Ein Hund.\nen_GB.utf8=A dog.\n",
    "odd/empty": "\n\n",
}


def _fake_stamps(root):
    for stem, text in STAMP_TXT.items():
        os.makedirs(os.path.dirname(os.path.join(root, stem)), exist_ok=True)
        Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(f"{root}/{stem}.png")
        with open(f"{root}/{stem}.txt", "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(f"{root}/animals/birds/blackbird_mirror.png")
    with open(f"{root}/symbols/money/us/coins/100sacagawea.dat", "w") as fh:
        fh.write("nomirror\nnoflip\n")
    with open(f"{root}/animals/birds/svgonly.svg", "w") as fh:
        fh.write("<svg xmlns='http://www.w3.org/2000/svg'/>")
    with open(f"{root}/animals/birds/svgonly.txt", "w") as fh:
        fh.write("An SVG bird.\n")
    Image.new("RGB", (5, 5)).save(f"{root}/animals/birds/nodesc.png")
    for n in range(60):  # enough stamps for a meaningful split
        os.makedirs(f"{root}/many", exist_ok=True)
        Image.new("RGB", (8, 8), (n, 0, 0)).save(f"{root}/many/s{n}.png")
        with open(f"{root}/many/s{n}.txt", "w") as fh:
            fh.write(f"Stamp number {n}.\n")
    with open(f"{root}/many/s0.png", "wb") as fh:  # broken image
        fh.write(b"\x89PNG\r\n\x1a\n\x00")


def test_stamp_caption_parsing():
    got = {stem: D.stamp_caption(text) for stem, text in STAMP_TXT.items()}
    assert got == {
        "animals/birds/blackbird": "A blackbird.",
        "symbols/money/us/coins/100sacagawea": 'A US "Sacagawea" dollar ($1.00).',
        "space/planets/4_mars": "Mars - the red planet. It's just beyond earth.",
        "sports/cartoon/helmet": "Because a brain is a terrible thing to waste...",
        "odd/translations_first": "A dog.",
        "odd/empty": "",
    }


def test_fake_stamps_split_flip_flags_and_skips(tmp_path):
    root = str(tmp_path / "stamps")
    _fake_stamps(root)
    train = D.TuxPaintStamps(root, split="train", test_fraction=0.2)
    test = D.TuxPaintStamps(root, split="test", test_fraction=0.2)
    every = D.TuxPaintStamps(root, split="all")
    ids = lambda ds: {r["id"] for r in ds.records}  # noqa: E731
    assert ids(train) & ids(test) == set() and ids(train) | ids(test) == ids(every)
    assert 0 < len(test) < len(train)
    assert "tuxpaint/animals/birds/blackbird_mirror" not in ids(every)
    assert every.skipped == Counter(svg_only=1, no_caption=1, empty_caption=1)
    by_id = {r["id"]: r for r in every.records}
    assert by_id["tuxpaint/symbols/money/us/coins/100sacagawea"]["flip_ok"] is False
    assert by_id["tuxpaint/animals/birds/blackbird"]["flip_ok"] is True
    item = every[list(by_id).index("tuxpaint/animals/birds/blackbird")]
    assert item["image"].getpixel((3, 3)) == (255, 255, 255)  # transparent -> white
    # Stable: the same split again, and a stamp's side never depends on what else is in the folder.
    assert ids(D.TuxPaintStamps(root, split="test", test_fraction=0.2)) == ids(test)
    # split_by="caption" keeps stamps that share a caption (s3 and twin) on one side.
    Image.new("RGB", (8, 8)).save(f"{root}/many/twin.png")
    with open(f"{root}/many/twin.txt", "w") as fh:
        fh.write("Stamp number 3.\n")
    for fraction in (0.3, 0.5, 0.7):
        test_ids = {r["id"] for r in D.TuxPaintStamps(root, split="test", test_fraction=fraction,
                                                       split_by="caption").records}
        assert ("tuxpaint/many/s3" in test_ids) == ("tuxpaint/many/twin" in test_ids)
    (tmp_path / "stamps" / "many" / "twin.png").unlink()
    # The broken PNG is skipped at fetch and counted.
    results = [every[i] for i in range(len(every))]
    assert sum(isinstance(r, D.Skipped) for r in results) == 1 and every.skipped["broken_image"] == 1
    for n in range(59, 40, -1):  # removing stamps moves no other stamp between the splits
        (tmp_path / "stamps" / "many" / f"s{n}.png").unlink()
    removed = {f"tuxpaint/many/s{n}" for n in range(41, 60)}
    assert ids(D.TuxPaintStamps(root, split="test", test_fraction=0.2)) == ids(test) - removed


def test_real_tuxpaint_stamps():
    if not os.path.isdir(D.TUXPAINT_STAMPS):
        pytest.skip("tuxpaint-stamps-default is not installed (apt-get install tuxpaint-stamps-default)")
    train, test = D.TuxPaintStamps(split="train"), D.TuxPaintStamps(split="test")
    assert len(train) > 500 and len(test) > 30
    assert not {r["id"] for r in train.records} & {r["id"] for r in test.records}
    texts = [r["text"] for r in train.records + test.records]
    assert all(t and "utf8=" not in t and "\n" not in t for t in texts)
    assert any(t == "A blackbird." for t in texts)
    item = test[0]
    assert item["image"].mode == "RGB" and item["source"] == "tuxpaint"


# ---------------------------------------------------------------------------------------------------------------
# easy-vqa


def _easy_vqa_answer(caption: str, question: str) -> str | None:
    """Answer an easy-vqa question from a full caption "a <colour> <shape>."."""
    color, shape = caption.rstrip(".").split()[1:]
    q = question.rstrip("?")
    words = set(q.split())
    if q.startswith("what") and ("color" in words):
        return color
    if q.startswith("what"):
        return shape
    named = words & ({shape, color} | set(D.easyvqa._EV_SHAPES) | set(D.easyvqa._EV_COLORS))
    present = all(w in (shape, color) for w in named)
    negated = " not " in f" {q} " or q.startswith("is no ")
    return "yes" if present != negated else "no"


def test_easy_vqa_captions_agree_with_every_question():
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install --no-deps easy-vqa==1.0)")
    train, test = D.EasyVQA("train"), D.EasyVQA("test")
    assert len(train) > 3500 and len(test) > 850
    assert {r["id"] for r in train.records}.isdisjoint(r["id"] for r in test.records)
    assert all("/train/" in r["id"] for r in train.records)
    checked = 0
    for record in train.records[:500]:
        if len(record["text"].split()) != 3:
            continue  # partial caption ("a circle.")
        for question, answer in record["qa"]:
            assert _easy_vqa_answer(record["text"], question) == answer, (record["text"], question, answer)
            checked += 1
    assert checked > 3000
    questions = D.EasyVQAQuestions("test")
    item = questions[0]
    assert set(item) >= {"image", "question", "answer", "id", "image_id"} and item["image"].size == (64, 64)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


def test_swap_left_right():
    assert D.swap_left_right("A red circle on the left, a Right arrow, LEFT.") == \
        "A red circle on the right, a Left arrow, RIGHT."
    assert D.swap_left_right("leftmost and right-hand; bright upright copyright") == \
        "rightmost and left-hand; bright upright copyright"
    assert D.swap_left_right(D.swap_left_right("left of right")) == "left of right"


def _asymmetric_item(text):
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)  # red half on the left
    return {"image": Image.fromarray(pixels), "text": text, "id": "x"}


def test_flip_always_swaps_left_right():
    gen = torch.Generator().manual_seed(0)
    transform = D.train_transform(24, scale=(0.9, 1.0), generator=gen)
    flips = 0
    for _ in range(60):
        out = transform(_asymmetric_item("a red box on the left"))
        left_is_red = np.asarray(out["image"])[:, :4, 0].mean() > 128
        assert out["image"].size == (24, 24)
        assert out["text"] == ("a red box on the left" if left_is_red else "a red box on the right")
        assert out["flipped"] == (not left_is_red)
        flips += out["flipped"]
    assert 10 < flips < 50
    # flip_ok=False never flips; "avoid" never flips a text with left/right; crop_ok=False only resizes.
    for _ in range(20):
        assert not transform({**_asymmetric_item("on the left"), "flip_ok": False})["flipped"]
        avoid = D.train_transform(24, left_right="avoid", generator=gen)
        assert not avoid(_asymmetric_item("on the left"))["flipped"]
    whole = transform({**_asymmetric_item("x"), "crop_ok": False, "flip_ok": False})["image"]
    assert whole.tobytes() == _asymmetric_item("x")["image"].resize((24, 24), Image.BICUBIC).tobytes()


def test_scenes_dataset_and_qa_flip():
    ds, again = D.Scenes(5, seed=1, size=64), D.Scenes(5, seed=1, size=64)
    assert ds[2]["text"] == again[2]["text"] and ds[2]["image"].tobytes() == again[2]["image"].tobytes()
    assert ds[0]["text"] != D.Scenes(5, seed=2, size=64)[0]["text"]
    assert ds[0]["crop_ok"] is False and ds[0]["qa"]
    transform = D.train_transform(64, flip_p=1.0)
    qa = [("Is A left of B?", "yes"), ("Where?", "top right")]
    out = transform({"image": ds[0]["image"], "text": "left", "id": "s", "qa": qa})
    assert out["qa"] == [("Is A right of B?", "yes"), ("Where?", "top left")]


# ---------------------------------------------------------------------------------------------------------------
# Feature cache


@pytest.fixture(scope="module")
def lite0():
    from blip2.encoders import build_encoder

    encoder = build_encoder({"type": "efficientnet-lite", "variant": "lite0"}).freeze()
    # The network is fully convolutional: 96 px inputs (3x3 tokens) keep the test fast on a busy 2-core box,
    # and show that the image size is part of the cache key.
    encoder.image_size = 96
    return encoder


@pytest.fixture
def one_thread():
    """Three tiny images gain nothing from intra-op threads, and on a busy 2-core box two threads wait on each
    other (measured: 3 images take 0.4 s with 2 threads, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_feature_cache_round_trip_stale_and_interrupted(tmp_path, lite0, monkeypatch, one_thread):
    from training.features import CachedFeatureDataset, FeatureCache, collate_features

    (tmp_path / "img").mkdir()
    rows = []
    for n in range(3):
        _png(tmp_path / "img" / f"{n}.png", (n * 80, 100, 200 - n * 60), size=(40 + n, 30))
        rows.append({"image": f"img/{n}.png", "caption": f"picture {n}"})
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    rows.insert(1, {"image": "img/bad.png", "caption": "broken"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = D.ManifestDataset(tmp_path / "m.jsonl")

    cache = FeatureCache.for_encoder(tmp_path / "cache", lite0, tag="m")
    stats = cache.build(ds, lite0, batch_size=4, dtype=torch.float32, shard_rows=2, progress=False)
    assert stats["count"] == 3 and stats["skipped"] == {"broken_image": 1} and stats["images_per_s"] > 0
    cached = CachedFeatureDataset(cache)
    assert len(cached) == 3 and len(cached.index["shards"]) == 2
    items = [it for it in D.iter_items(ds)]
    with torch.inference_mode():
        direct = lite0(lite0.preprocess([it["image"] for it in items]))  # (3, 9, 1280)
    batch = collate_features([cached[i] for i in range(3)])
    assert batch["texts"] == [it["text"] for it in items] and batch["ids"] == [it["id"] for it in items]
    torch.testing.assert_close(batch["image_embeds"], direct, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached.features(items[2]["id"]), cached[2]["image_embeds"])
    # Shipped to a DataLoader worker (pickled without open handles).
    loader = torch.utils.data.DataLoader(cached, batch_size=3, num_workers=1, collate_fn=collate_features)
    torch.testing.assert_close(next(iter(loader))["image_embeds"], direct, rtol=1e-4, atol=1e-4)

    # A complete cache is reused; fp16 features are close to the encoder's.
    assert cache.build(ds, lite0, progress=False) == stats
    # A different spec (or image size) has a different key: never the stale cache.
    other = FeatureCache(tmp_path / "cache", {"type": "efficientnet-lite", "variant": "lite1"}, 240, tag="m")
    assert other.key != cache.key and not other.is_complete()
    assert cache.image_size == 96 and direct.shape == (3, 9, 1280)
    assert FeatureCache(tmp_path / "cache", lite0.spec, 224, tag="m").key != cache.key
    with pytest.raises(ValueError, match="differs"):
        other.build(ds, lite0, progress=False)

    # Interrupted build: nothing complete is left behind, and the next build starts over.
    half = FeatureCache.for_encoder(tmp_path / "cache", lite0, tag="half")
    import safetensors.torch

    calls = {"n": 0}
    real_save = safetensors.torch.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        half.build(ds, lite0, batch_size=4, dtype=torch.float16, progress=False)
    assert not half.is_complete() and not os.path.exists(half.path)
    assert any(".tmp-" in name for name in os.listdir(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        CachedFeatureDataset(half)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    stats16 = half.build(ds, lite0, batch_size=4, dtype=torch.float16, progress=False)
    assert stats16["count"] == 3 and half.is_complete()
    assert not any(".tmp-" in name for name in os.listdir(tmp_path / "cache"))
    fp16 = CachedFeatureDataset(half)[0]["image_embeds"]
    assert fp16.dtype == torch.float16
    torch.testing.assert_close(fp16.float(), direct[0], rtol=1e-2, atol=1e-2)

    with pytest.raises(ValueError, match="transform"):
        FeatureCache.for_encoder(tmp_path / "cache", lite0, tag="aug").build(
            D.ManifestDataset(tmp_path / "m.jsonl", transform=D.train_transform(224)), lite0, progress=False)


def test_concat_and_loader_workers_report_skips(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    rows = [{"image": "ok.png", "caption": "fine"}, {"image": "bad.png", "caption": "broken"}] * 3
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    both = D.ConcatPairs([D.ManifestDataset(tmp_path / "m.jsonl"), D.Scenes(4, size=32)])
    assert len(both) == 10 and both.locate(7) == (1, 1)
    weights = both.sample_weights([1.0, 3.0])
    assert torch.isclose(weights[:6].sum() * 3, weights[6:].sum())
    loader = torch.utils.data.DataLoader(both, batch_size=4, num_workers=2, collate_fn=D.collate_pairs)
    texts, skipped = [], Counter()
    for batch in loader:
        texts += batch["texts"]
        skipped += batch["skipped"]
    assert skipped == Counter(broken_image=3) and len(texts) == 7 and texts[:3] == ["fine"] * 3


def test_fine_tuned_encoder_features_get_their_own_cache(tmp_path, lite0, one_thread):
    """A checkpoint whose image encoder was fine-tuned must not reuse the pretrained encoder's cached features."""
    from types import SimpleNamespace

    from training.config import Stage1Data
    from training.features import cached_dataset, weights_digest

    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "0.png", (200, 30, 30), size=(32, 32))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "img/0.png", "caption": "red"}))
    ds = D.ManifestDataset(tmp_path / "m.jsonl")
    data_cfg = Stage1Data(cache_dir=str(tmp_path / "cache"), sources=[{"type": "manifest"}], feature_dtype="float32")
    main = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)

    pretrained_state = {k: v.clone() for k, v in lite0.state_dict().items()}
    assert weights_digest(pretrained_state) == weights_digest(lite0.state_dict())
    pretrained, _ = cached_dataset(ds, lite0, data_cfg, tmp_path, main)
    with torch.no_grad():
        lite0.net._conv_head.weight.mul_(1.5)  # "fine-tuned"
    tuned_state = lite0.state_dict()
    assert weights_digest(tuned_state) != weights_digest(pretrained_state)
    tuned, _ = cached_dataset(ds, lite0, data_cfg, tmp_path, main, encoder_weights=weights_digest(tuned_state))
    assert tuned.path != pretrained.path
    with torch.inference_mode():
        direct = lite0(lite0.preprocess([next(iter(D.iter_items(ds)))["image"]]))[0]
    torch.testing.assert_close(tuned[0]["image_embeds"], direct, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pretrained[0]["image_embeds"], direct, rtol=1e-3, atol=1e-3)
    lite0.load_state_dict(pretrained_state)  # the fixture is shared


def test_replace_broken_keeps_the_batch_size_and_counts():
    good_a, good_b = {"id": "a"}, {"id": "b"}
    skipped = Counter()
    batch = D.replace_broken([good_a, D.Skipped("broken_image", "x"), good_b, D.Skipped("broken_image", "y")], skipped)
    assert [item["id"] for item in batch] == ["a", "b", "b", "b"]  # slot i gets good[i % 2]: size kept
    assert skipped == Counter(broken_image=2)
    assert D.replace_broken([good_a], skipped) == [good_a] and skipped == Counter(broken_image=2)
    with pytest.raises(RuntimeError, match="Every image of a batch failed"):
        D.replace_broken([D.Skipped("broken_image", "x")], Counter())
