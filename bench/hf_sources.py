"""transformers model directories for sweeps: tiny configs, random weights, saved by save_pretrained.

    python bench/hf_sources.py [--quick] [--workdir DIR]   # build them and run `gradcheck inspect` on each

``hf_directories(workdir, quick=...)`` is the library entry point (bench/zoo.py and the gate
corpus call it): one directory per architecture, written by the *installed* transformers' own
``save_pretrained``, so the sweep sees what users' directories look like (current key names,
tied weights stored once, the config's dtype). Every config is tiny (hidden 32, 2 layers) so a
directory is built and probed in a second or two. An architecture the installed transformers
does not have is left out (and named by ``missing_architectures``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Shared tiny sizes, spelled the way most BERT-style configs spell them.
_BERTISH: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
_LLAMAISH: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
_BARTISH: dict[str, Any] = {
    "vocab_size": 128,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "decoder_start_token_id": 2,
}
_VIT: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "num_labels": 3,
}
_WAV2VEC: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "conv_dim": (16, 16),
    "conv_kernel": (10, 3),
    "conv_stride": (5, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "vocab_size": 32,
}

# (model class, modality, config keyword arguments). Modalities: text-encoder, decoder, seq2seq,
# vision, audio, multimodal, state-space.
ARCHITECTURES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("BertForMaskedLM", "text-encoder", _BERTISH),
    ("RobertaForMaskedLM", "text-encoder", {**_BERTISH, "pad_token_id": 1}),
    (
        "DistilBertForSequenceClassification",
        "text-encoder",
        {"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 64},
    ),
    ("AlbertForMaskedLM", "text-encoder", {**_BERTISH, "embedding_size": 16}),
    ("ElectraForMaskedLM", "text-encoder", {**_BERTISH, "embedding_size": 32}),
    ("DebertaV2ForMaskedLM", "text-encoder", _BERTISH),
    ("XLMRobertaModel", "text-encoder", {**_BERTISH, "pad_token_id": 1}),
    ("MPNetForMaskedLM", "text-encoder", {**_BERTISH, "pad_token_id": 1}),
    (
        "ModernBertForMaskedLM",
        "text-encoder",
        {**_BERTISH, "global_attn_every_n_layers": 2, "local_attention": 16, "pad_token_id": 0},
    ),
    ("GPT2LMHeadModel", "decoder", {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    ("GPTNeoXForCausalLM", "decoder", {**_BERTISH, "rotary_pct": 0.5}),
    ("LlamaForCausalLM", "decoder", _LLAMAISH),
    ("MistralForCausalLM", "decoder", _LLAMAISH),
    ("Qwen2ForCausalLM", "decoder", _LLAMAISH),
    ("GemmaForCausalLM", "decoder", {**_LLAMAISH, "head_dim": 8}),
    ("PhiForCausalLM", "decoder", _LLAMAISH),
    (
        "OPTForCausalLM",
        "decoder",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
        },
    ),
    ("BloomForCausalLM", "decoder", {"vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 4}),
    ("FalconForCausalLM", "decoder", {**_BERTISH, "new_decoder_architecture": False}),
    (
        "GPTJForCausalLM",
        "decoder",
        {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
    ),
    (
        "T5ForConditionalGeneration",
        "seq2seq",
        {
            "vocab_size": 128,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
        },
    ),
    ("BartForConditionalGeneration", "seq2seq", _BARTISH),
    ("MarianMTModel", "seq2seq", {**_BARTISH, "pad_token_id": 0, "decoder_start_token_id": 0}),
    ("PegasusForConditionalGeneration", "seq2seq", {**_BARTISH, "pad_token_id": 0, "decoder_start_token_id": 0}),
    ("MBartForConditionalGeneration", "seq2seq", _BARTISH),
    ("ViTForImageClassification", "vision", _VIT),
    ("DeiTForImageClassification", "vision", _VIT),
    ("BeitForImageClassification", "vision", _VIT),
    ("Dinov2Model", "vision", _VIT),
    (
        "SwinForImageClassification",
        "vision",
        {
            "image_size": 32,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 4],
            "window_size": 4,
            "num_labels": 3,
        },
    ),
    (
        "ConvNextForImageClassification",
        "vision",
        {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "num_labels": 3, "image_size": 32},
    ),
    (
        "ResNetForImageClassification",
        "vision",
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "num_labels": 3},
    ),
    ("MobileNetV2ForImageClassification", "vision", {"image_size": 32, "depth_multiplier": 0.25, "num_labels": 3}),
    (
        "SegformerForImageClassification",
        "vision",
        {
            "num_encoder_blocks": 2,
            "depths": [1, 1],
            "sr_ratios": [2, 1],
            "hidden_sizes": [16, 32],
            "patch_sizes": [7, 3],
            "strides": [4, 2],
            "num_attention_heads": [1, 2],
            "mlp_ratios": [2, 2],
            "num_labels": 3,
            "image_size": 32,
        },
    ),
    ("VideoMAEForVideoClassification", "vision", {**_VIT, "num_frames": 4, "tubelet_size": 2}),
    (
        "WhisperForConditionalGeneration",
        "audio",
        {
            "vocab_size": 128,
            "num_mel_bins": 16,
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_source_positions": 32,
            "max_target_positions": 32,
            "pad_token_id": 0,
            "decoder_start_token_id": 1,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    ("Wav2Vec2ForCTC", "audio", _WAV2VEC),
    ("HubertModel", "audio", _WAV2VEC),
    ("WavLMModel", "audio", {**_WAV2VEC, "num_buckets": 16, "max_bucket_distance": 32}),
    (
        "ASTForAudioClassification",
        "audio",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "patch_size": 8,
            "frequency_stride": 8,
            "time_stride": 8,
            "max_length": 32,
            "num_mel_bins": 16,
            "num_labels": 3,
        },
    ),
    (
        "Speech2TextForConditionalGeneration",
        "audio",
        {
            **_BARTISH,
            "input_feat_per_channel": 16,
            "input_channels": 1,
            "conv_channels": 16,
            "max_source_positions": 256,
            "max_target_positions": 64,
            "pad_token_id": 1,
            "decoder_start_token_id": 2,
        },
    ),
    (
        "CLIPModel",
        "multimodal",
        {
            "text_config": {**_BERTISH, "max_position_embeddings": 32},
            "vision_config": {k: v for k, v in _VIT.items() if k != "num_labels"},
            "projection_dim": 16,
        },
    ),
    (
        "SiglipModel",
        "multimodal",
        {
            "text_config": {**_BERTISH, "max_position_embeddings": 32},
            "vision_config": {k: v for k, v in _VIT.items() if k != "num_labels"},
        },
    ),
    (
        "MambaForCausalLM",
        "state-space",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "state_size": 8,
            "num_hidden_layers": 2,
            "expand": 2,
            "conv_kernel": 4,
            "use_mambapy": True,
        },
    ),
    (
        "Mamba2ForCausalLM",
        "state-space",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "state_size": 8,
            "num_hidden_layers": 2,
            "expand": 2,
            "num_heads": 8,
            "head_dim": 8,
            "n_groups": 1,
            "chunk_size": 16,
            "conv_kernel": 4,
        },
    ),
    (
        "FalconMambaForCausalLM",
        "state-space",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "state_size": 8,
            "num_hidden_layers": 2,
            "expand": 2,
            "conv_kernel": 4,
            "use_mambapy": True,
        },
    ),
)

QUICK = ("BertForMaskedLM", "GPT2LMHeadModel", "ViTForImageClassification", "CLIPModel")


def missing_architectures() -> list[str]:
    import transformers

    return [name for name, _, _ in ARCHITECTURES if not hasattr(transformers, name)]


def hf_directories(workdir: Path, *, quick: bool) -> list[tuple[str, str, Path]]:
    """(architecture, modality, directory) for each architecture of the installed transformers,
    saved under ``workdir`` (reused when already there)."""
    import transformers

    chosen = [a for a in ARCHITECTURES if not quick or a[0] in QUICK]
    return [
        (name, modality, hf_directory(workdir, name)) for name, modality, _ in chosen if hasattr(transformers, name)
    ]


def hf_directory(workdir: Path, name: str) -> Path:
    """The directory of one architecture, written by ``save_pretrained`` under ``workdir`` the
    first time it is asked for (seeded: the same weights every time)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs = next(k for n, _, k in ARCHITECTURES if n == name)
    directory = workdir / name
    if not (directory / "config.json").is_file():
        cls = getattr(transformers, name)
        torch.manual_seed(0)
        model = cls(cls.config_class(**kwargs))
        model.save_pretrained(str(directory))
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gradcheck-hf-sources"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    directories = hf_directories(args.workdir, quick=args.quick)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ok = 0
    rows = []
    for name, modality, directory in directories:
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "gradcheck_cli", "inspect", str(directory), "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        seconds = time.perf_counter() - start
        if run.returncode in (0, 1):
            report = json.loads(run.stdout)
            inputs = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in report["probe"]["inputs"])
            status, detail = "ok", f"loss {report['probe']['loss']}; {inputs}"
            ok += 1
        else:
            lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
            status, detail = "failed", (lines[0] if lines else f"exit {run.returncode}")[:240]
        rows.append((name, modality, status, seconds, detail))
        print(f"{status:6} {name:40} {modality:12} {seconds:5.1f}s  {detail}", flush=True)
    missing = missing_architectures()
    print(
        f"\n{ok}/{len(directories)} architectures probe"
        + (f"; not in this transformers: {', '.join(missing)}" if missing else "")
    )
    return 0 if ok == len(directories) else 1


if __name__ == "__main__":
    raise SystemExit(main())
