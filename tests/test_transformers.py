"""Transformers probed as they are used: inputs from the model itself, its own LM loss, attention rows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gradcheck_cli import api
from gradcheck_cli.gate.rules import evaluate
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.records import Report, RowKind
from tests.conftest import validate_report

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def bert(head: str = "BertForMaskedLM") -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, max_position_embeddings=64, **TINY)
    return getattr(transformers, head)(config)


def gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def vit() -> Any:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **TINY)
    return transformers.ViTForImageClassification(config)


def probe(model: Any, **kwargs: Any) -> Report:
    report = api.inspect_module(model, ProbeOptions(**kwargs))
    validate_report(report.to_dict())
    return report


def test_bert_masked_lm_end_to_end() -> None:
    report = probe(bert())
    assert [s.name for s in report.probe.inputs] == ["input_ids", "attention_mask", "labels"]
    assert report.probe.inputs[0].high == 120
    assert report.probe.loss == "model" and report.probe.output == "output['loss']"
    blocks = [r for r in report.layers if r.type == "BertLayer"]
    assert [b.name for b in blocks] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    norms = [r for r in report.layers if r.type == "LayerNorm"]
    assert norms and all(r.input is not None and r.output.var is not None for r in norms)
    attention = [r for r in report.layers if r.fn == "attention"]
    assert len(attention) == 2
    for row in attention:
        assert row.attention is not None and row.attention.heads == 4
        # Random init: nearly uniform attention over the 16 keys.
        assert all(e == pytest.approx(row.attention.max_entropy, rel=0.05) for e in row.attention.entropy)
        assert row.saturation is not None and row.saturation.fraction == 0.0
    gelus = [r for r in report.layers if r.fn == "gelu"]
    assert len(gelus) == 3 and all(r.kind is RowKind.ACTIVATION for r in gelus)


def test_model_loss_is_the_heads_own_loss() -> None:
    model = bert()
    report = probe(model, inputs=InputOptions(seq_len=8))
    ids = torch.randint(0, 120, (8, 8), generator=torch.Generator().manual_seed(0))
    assert report.probe.inputs[0].shape == (8, 8)
    assert report.probe.loss_value is not None
    # Seeded random labels over a 120-token vocabulary: the loss of a random model is about log(120).
    assert report.probe.loss_value == pytest.approx(float(torch.log(torch.tensor(120.0))), rel=0.1)
    del ids


def test_layernorm_input_statistics_are_its_input() -> None:
    model = bert("BertModel").eval()
    report = probe(model, loss=LossKind.MSE)
    row = next(r for r in report.layers if r.name == "bert.embeddings.LayerNorm" or r.name == "embeddings.LayerNorm")
    ids = torch.randint(0, 120, (8, 16), generator=torch.Generator().manual_seed(0))
    captured: dict[str, torch.Tensor] = {}
    handle = model.embeddings.LayerNorm.register_forward_hook(
        lambda m, args, out: captured.setdefault("x", args[0].detach())
    )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    assert row.input is not None
    assert row.input.var == pytest.approx(float(captured["x"].var(unbiased=False)), rel=1e-4)


def test_gpt2_causal_lm() -> None:
    report = probe(gpt2())
    assert report.probe.loss == "model"
    attention = [r for r in report.layers if r.fn == "attention"]
    assert len(attention) == 2
    for row in attention:
        assert row.attention is not None
        # Causal attention: query t sees t+1 keys, so the mean entropy is below log(16).
        assert max(row.attention.entropy) < row.attention.max_entropy
    assert [r.name for r in report.layers if r.type == "GPT2Block"] == ["transformer.h.0", "transformer.h.1"]


def test_vit_pixel_values() -> None:
    report = probe(vit())
    assert report.probe.inputs[0].name == "pixel_values" and report.probe.inputs[0].shape == (8, 3, 32, 32)
    assert report.probe.loss == "cross_entropy"
    assert any(r.fn == "attention" for r in report.layers)


def test_one_hot_attention_is_reported_as_saturated() -> None:
    model = bert("BertModel")
    with torch.no_grad():
        for layer in model.encoder.layer:
            attention = layer.attention.self
            for projection in (attention.query, attention.key):
                projection.weight.copy_(30 * torch.eye(32))
                projection.bias.zero_()
    report = probe(model, loss=LossKind.MSE)
    rows = [r for r in report.layers if r.fn == "attention"]
    assert rows and all(r.saturation is not None and r.saturation.fraction > 0.9 for r in rows)
    assert all(max(r.attention.entropy) < 0.1 for r in rows if r.attention is not None)
    assert "saturated-activation" in {f.rule for f in evaluate(report) if f.layer in {r.name for r in rows}}


def test_directory_with_sharded_safetensors(tmp_path: Path, cli: Any) -> None:
    model = bert()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    code, out, err = cli("inspect", tmp_path, "--format", "json", "--seq-len", "8")
    assert code == 0, err
    from_dir = json.loads(out)
    validate_report(from_dir)
    assert from_dir["model"]["format"] == "transformers_directory"
    in_memory = probe(bert(), inputs=InputOptions(seq_len=8)).to_dict()
    assert [r["name"] for r in from_dir["layers"]] == [r["name"] for r in in_memory["layers"]]
    for a, b in zip(from_dir["layers"], in_memory["layers"], strict=True):
        assert a["output"]["var"] == pytest.approx(b["output"]["var"], rel=1e-5)


def test_arch_spec_with_config_next_to_the_weights(tmp_path: Path, cli: Any) -> None:
    from safetensors.torch import save_file

    model = bert("BertModel")
    model.config.to_json_file(str(tmp_path / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    code, out, err = cli(
        "inspect",
        tmp_path / "weights.safetensors",
        "--arch",
        "transformers:BertModel",
        "--format",
        "json",
        "--loss",
        "mse",
    )
    assert code == 0, err
    assert json.loads(out)["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    code, _, err = cli("inspect", tmp_path / "weights.safetensors", "--arch", "transformers:NoSuchModel")
    assert code == 2 and "no model class" in err


@pytest.mark.parametrize("head", ["T5ForConditionalGeneration", "T5Model"])
def test_t5_encoder_decoder(head: str) -> None:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0
    )
    report = probe(getattr(transformers, head)(config))
    names = [s.name for s in report.probe.inputs]
    if head == "T5Model":
        assert names == ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"]
        assert report.probe.loss == "mse"
    else:
        assert names == ["input_ids", "attention_mask", "labels"] and report.probe.loss == "model"
    # Encoder self-attention, decoder self-attention and cross-attention, in each of two layers.
    assert sum(1 for r in report.layers if r.fn == "attention") == 6
    assert [r.name for r in report.layers if r.type == "T5Block"] == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
    ]
