"""Reading tensors out of a transformers checkpoint (a local folder or a Hugging Face hub id) without building
its model: only the safetensors shards that hold the wanted weights are opened."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError


def load_prefixed_state_dict(source: str, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` (prefix removed) from a transformers checkpoint folder or hub id, reading only the
    safetensors shards that hold them (e.g. the EVA ViT out of a full official BLIP-2 checkpoint)."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:  # offline, unknown repo, ...
            raise CheckpointError(f"Could not fetch {source!r} from the Hugging Face hub: {exc}") from exc
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    state[key[len(prefix):]] = handle.get_tensor(key)
    if not state:
        raise CheckpointError(f"No weights under '{prefix}' in {source}.")
    return state
