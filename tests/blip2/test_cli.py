"""The command line, run as users run it: `python -m blip2 ...` in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--precision", "fp32", "--device", "cpu", "--max-new-tokens", "5", "--min-new-tokens", "5"]


def run(*args, stdin=""):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "blip2", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from conftest import image

    path = tmp_path_factory.mktemp("img") / "pic.png"
    image(0).save(path)
    return path


def test_ask_prints_the_same_answer_as_the_api(our_checkpoint, picture):
    import blip2

    result = run("ask", str(picture), "what is it?", "--model", str(our_checkpoint), *FAST)
    assert result.returncode == 0, result.stderr
    model = blip2.load(str(our_checkpoint), precision="fp32", device="cpu")
    expected = model.ask(str(picture), "what is it?", max_new_tokens=5, min_new_tokens=5)
    assert result.stdout.strip() == expected


def test_caption_on_official_checkpoint(opt_checkpoint, picture):
    result = run("caption", str(picture), "--model", str(opt_checkpoint), *FAST, "--num-beams", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_bad_image_is_one_clear_line(our_checkpoint, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    result = run("ask", str(bad), "what?", "--model", str(our_checkpoint), *FAST)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_missing_model_is_one_clear_line(picture):
    result = run("ask", str(picture), "what?", "--model", "/nope/model", *FAST)
    assert result.returncode == 2 and "Checkpoint not found" in result.stderr


@pytest.mark.parametrize("args, named", [
    (["--num-beams", "1000"], "num_beams"),
    (["--sample", "--temperature", "nan"], "temperature"),
    (["--seed", str(2**70)], "seed"),
    (["--max-new-tokens", "ten"], "--max-new-tokens"),  # argparse's own error, without its page of usage
])
def test_bad_decoding_setting_is_one_clear_line_before_loading(picture, args, named):
    result = run("ask", str(picture), "what?", "--model", "/nope/model", *args)  # refused before the model is looked up
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_fp16_on_cpu_is_refused(picture):
    result = run("caption", str(picture), "--precision", "fp16", "--device", "cpu")
    assert result.returncode == 2 and "fp16 needs a CUDA GPU" in result.stderr


def test_interactive_chat(our_checkpoint, picture, tmp_path):
    other = tmp_path / "other.png"
    from conftest import image

    image(1).save(other)
    script = f"what is it?\nand now?\n/new {other}\n/new /no/such.png\nhello\n/quit\n"
    result = run("chat", str(picture), "--model", str(our_checkpoint), *FAST, stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("model> ") == 3  # three questions answered
    assert "(new conversation)" in out and "not found" in out.lower()
