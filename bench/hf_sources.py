"""transformers directories for the zoo sweep (minimal stand-in; the full list lives in the
transformers helper's version of this module, which replaces this one at merge).

    hf_directories(workdir, quick=...) -> [(architecture, modality, directory)]

Each directory is written once by ``save_pretrained`` from a tiny config with random weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64))


def _vit() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4))


_BUILDERS: list[tuple[str, str, Callable[[], Any]]] = [
    ("BertForSequenceClassification", "text", _bert),
    ("GPT2LMHeadModel", "text", _gpt2),
    ("ViTForImageClassification", "vision", _vit),
]


def hf_directories(workdir: Path, *, quick: bool) -> list[tuple[str, str, Path]]:
    import torch

    found = []
    for name, modality, build in _BUILDERS[:2] if quick else _BUILDERS:
        directory = workdir / "hf" / name
        if not (directory / "config.json").exists():
            torch.manual_seed(0)
            build().save_pretrained(directory)
        found.append((name, modality, directory))
    return found
