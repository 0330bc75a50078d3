"""Named pictures: concept words, the held-out-by-concept split, the naming score, colour labels, the emoji source
and the data fetcher (on fake npm packages made in tmp_path; the real data when it is in the cache)."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import concepts as C
from training.data.emoji import EmojiPictures
from training.data.fetch import SOURCES, DataNotFetchedError, data_cache, fetch, require
from training.data.pairs import iter_items


def _made_up_words(n: int, prefix: str = "zo") -> list[str]:
    """n distinct alphabetic words ("zoaaa", "zoaab", ...): concept words are letters only."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [prefix + letters[i // 676 % 26] + letters[i // 26 % 26] + letters[i % 26] + "k" for i in range(n)]


def test_word_key_folds_plurals_and_possessives():
    assert [C.word_key(w) for w in ["Cats", "berries", "boxes", "glass", "bus", "dog's", "leaves"]] == [
        "cat", "berry", "box", "glass", "bus", "dog", "leave"]


def test_concept_words_drop_generic_words_and_colours():
    assert C.concept_words("dog face") == ["dog"]
    assert C.concept_words("A red apple with a leaf.") == ["apple", "leaf"]
    assert C.concept_words("the letter W") == []


def test_held_out_is_a_pure_function_of_the_word_at_the_stated_fraction():
    words = _made_up_words(4000)
    share = np.mean([C.held_out_word(w) for w in words])
    assert abs(share - C.TEST_FRACTION) < 0.02
    assert C.held_out_word("Cats") == C.held_out_word("cat")
    # A concept is held out with every picture that shares one of its words.
    held = next(w for w in words if C.held_out_word(w))
    assert C.Concept(f"{held} face").held_out and C.Concept(f"big {held}").held_out
    assert C.Concept(f"{held} face").split() == "test"


def test_a_synonym_of_a_held_out_concept_keeps_a_concept_out_of_training():
    kept = next(w for w in _made_up_words(100) if not C.held_out_word(w))
    assert C.Concept(kept).split() == "train"
    assert C.Concept(kept).split(forbidden={C.word_key(kept)}) == "excluded"
    assert C.Concept("the letter W").split() == "excluded"  # names no concept


def test_names_object_matches_whole_words_with_plurals():
    accepted = C.Concept("dog face", ["puppy", "pet animal"]).accepted
    assert accepted == ["dog", "puppy"]  # multi-word tags are not synonyms; generic words never are
    assert C.names_object("Two dogs on the grass.", accepted)
    assert C.names_object("A PUPPY.", accepted)
    assert not C.names_object("A hotdog.", accepted)
    assert not C.names_object("A face.", accepted)


def _drawn(colour, background=(0, 0, 0, 0), share=0.6):
    image = Image.new("RGBA", (40, 40), background)
    side = int(40 * share ** 0.5)
    image.paste(Image.new("RGBA", (side, side), colour), (0, 0))
    return image


@pytest.mark.parametrize("rgb, name", [((220, 30, 30), "red"), ((30, 60, 220), "blue"), ((40, 180, 60), "green"),
                                       ((250, 220, 40), "yellow"), ((120, 70, 20), "brown"), ((10, 10, 10), "black"),
                                       ((128, 128, 128), "gray")])
def test_colour_name_of_a_drawn_shape_on_transparent_or_white(rgb, name):
    assert C.colour_name(_drawn((*rgb, 255))) == name
    assert C.colour_name(_drawn((*rgb, 255), background=(255, 255, 255, 255))) == name


def test_colour_name_is_none_without_a_dominant_colour():
    image = Image.new("RGB", (40, 40), "white")
    for i, colour in enumerate(["red", "blue", "green", "yellow", "purple"]):
        image.paste(colour, (i * 8, 0, i * 8 + 8, 40))
    assert C.colour_name(image) is None
    assert C.colour_name(Image.new("RGBA", (40, 40), (0, 0, 0, 0))) is None  # nothing drawn


# ---------------------------------------------------------------------------------------------------------------
# The emoji source on a fake cache: two styles, a few concepts


def _png(colour):
    buf = io.BytesIO()
    _drawn((*colour, 255)).save(buf, "PNG")
    return buf.getvalue()


def _fake_cache(root: Path, names: list[tuple[str, str, list[str]]]):
    """names: (hexcode, annotation, tags). Writes the three sources as fetch() leaves them."""
    openmoji = [{"hexcode": code.upper(), "annotation": name, "tags": ", ".join(tags), "group": "food-drink",
                 "skintone": ""} for code, name, tags in names]
    openmoji.append({"hexcode": "1F44D-1F3FB", "annotation": "thumbs up: light skin tone", "tags": "",
                     "group": "food-drink", "skintone": 1})
    (root / "openmoji" / "data").mkdir(parents=True)
    (root / "openmoji" / "data" / "openmoji.json").write_text(json.dumps(openmoji))
    (root / "openmoji" / "SOURCE.json").write_text("{}")
    for style, source in (("google", "emoji-google"), ("twitter", "emoji-twitter")):
        folder = root / source / "img" / style / "64"
        folder.mkdir(parents=True)
        entries = []
        for i, (code, _, _) in enumerate(names):
            # emoji.json spells some codepoints with the FE0F selector that openmoji.json leaves out
            entries.append({"unified": f"{code.upper()}-FE0F" if i % 2 else code.upper(), "image": f"{code}.png",
                            f"has_img_{style}": True})
            (folder / f"{code}.png").write_bytes(_png((200, 30 + 20 * i, 30)))
        (root / source / "emoji.json").write_text(json.dumps(entries))
        (root / source / "SOURCE.json").write_text("{}")


def _words(text):
    return set(C.reply_words(text))


def _check_split_invariants(train, test):
    train_text = set()
    for item in iter_items(train):
        train_text |= _words(item["text"]) | {w for q, a in item["qa"] for w in _words(q) | _words(a)}
    test_items = list(iter_items(test))
    assert test_items and len(train) > 0
    for item in test_items:  # no held-out name or synonym in any training caption, question or answer
        assert not set(item["accepted"]) & train_text, item["id"]
    by_code = {}
    for ds, split in ((train, "train"), (test, "test")):
        for record in ds.records:
            by_code.setdefault(record["id"].split("/")[-1], set()).add(split)
    assert all(len(sides) == 1 for sides in by_code.values())  # every style of an emoji on the same side


def test_emoji_split_holds_concepts_out_in_every_style(tmp_path):
    held = [w for w in _made_up_words(200, "fru") if C.held_out_word(w)][:3]
    kept = [w for w in _made_up_words(200, "fru") if not C.held_out_word(w)][:6]
    # The first held-out concept has a kept concept's name as a synonym (tag): that concept is used nowhere.
    names = [(f"1f{300 + i}", f"{w} face", [kept[4]] if i == 0 else []) for i, w in enumerate(held)]
    names += [(f"1f{400 + i}", w, []) for i, w in enumerate(kept[:4])]
    names.append(("1f501", kept[4], []))
    _fake_cache(tmp_path, names)
    train = EmojiPictures("train", root=tmp_path)
    test = EmojiPictures("test", root=tmp_path)
    assert len(test) == 2 * len(held)
    assert {r["concept"] for r in train.records} == set(kept[:4])  # not kept[4], nor "thumbs up" (a skin tone)
    assert train.skipped["split_excluded"] == 2
    _check_split_invariants(train, test)
    item = train[0]
    assert item["image"].mode == "RGB" and item["concept"] in item["text"]
    questions = dict(item["qa"])
    assert questions["What is in this picture?"].endswith(f"{item['concept']}.")
    assert questions[f"Is there a {item['concept']} in the picture?"] == "yes"
    assert questions["What colour is the " + item["concept"] + "?"] in ("red", "orange")
    assert [a for q, a in item["qa"] if q.startswith("Is there") and a == "no"]


def test_emoji_without_fetched_data_names_the_fetch_command(tmp_path):
    with pytest.raises(DataNotFetchedError, match="python -m training fetch-data openmoji"):
        EmojiPictures("train", root=tmp_path)


@pytest.mark.skipif(not (data_cache() / "openmoji" / "SOURCE.json").is_file()
                    or not (data_cache() / "emoji-google" / "SOURCE.json").is_file(),
                    reason="emoji data not fetched (python -m training fetch-data)")
def test_real_emoji_split_keeps_held_out_names_out_of_training():
    train, test = EmojiPictures("train", with_colour=False), EmojiPictures("test", with_colour=False)
    assert len(train) > 800 and len(test) > 150
    _check_split_invariants(train, test)


# ---------------------------------------------------------------------------------------------------------------
# fetch-data with a fake npm


def _fake_npm(bin_dir: Path, fail: bool = False) -> None:
    """An `npm` that answers `npm pack PKG@VER --pack-destination DIR` with a tarball holding package/ files."""
    script = f"""#!{sys.executable}
import io, sys, tarfile
args = sys.argv[1:]
if {fail!r}:
    print("npm ERR! 404 Not Found", file=sys.stderr); sys.exit(1)
dest = args[args.index("--pack-destination") + 1]
with tarfile.open(dest + "/pkg-1.0.0.tgz", "w:gz") as tar:
    for name in ["package/data/openmoji.json", "package/LICENSE.txt", "package/color/svg/1F600.svg"]:
        data = b"{{}}"
        info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))
"""
    npm = bin_dir / "npm"
    npm.write_text(script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_fetch_extracts_only_what_is_used_and_records_the_licence(tmp_path, monkeypatch):
    _fake_npm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    folder = fetch(["openmoji"], root=tmp_path / "cache")["openmoji"]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["LICENSE.txt", "SOURCE.json", "data/openmoji.json"]  # the SVGs are not kept
    record = json.loads((folder / "SOURCE.json").read_text())
    assert record["licence"] == SOURCES["openmoji"].licence and record["version"] == "17.0.0"
    assert require("openmoji", tmp_path / "cache") == folder


def test_a_failed_fetch_leaves_no_folder_and_says_why(tmp_path, monkeypatch):
    _fake_npm(tmp_path, fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataNotFetchedError, match="404 Not Found"):
        fetch(["openmoji"], root=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DataNotFetchedError, match="fetch-data openmoji"):
        require("openmoji", tmp_path / "cache")


def test_fetch_without_npm_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(DataNotFetchedError, match="apt-get install npm"):
        fetch(["emoji-google"], root=tmp_path / "cache")
    with pytest.raises(ValueError, match="Unknown data source"):
        fetch(["emoji-apple"], root=tmp_path / "cache")


def test_fetch_data_command_line(tmp_path, monkeypatch):
    _fake_npm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    from training.__main__ import main

    assert main(["fetch-data", "openmoji", "--cache", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "openmoji" / "SOURCE.json").is_file()
    assert main(["fetch-data", "nope", "--cache", str(tmp_path / "c")]) == 2
