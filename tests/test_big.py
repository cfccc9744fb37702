"""Big models: the lean gradient reduction, half precision, memory-mapped loading, the memory bound,
activation checkpointing and the probe under torchrun, each against an independent computation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.records import Report
from tests._big_models import Wide, blocks_net, tied
from tests.conftest import validate_report

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "_big_models.py"


def _probe_file(
    module: nn.Module, inputs: Path, targets: Path | None, *, batch_size: int | None = None, **options: Any
) -> Report:
    opts = ProbeOptions(
        inputs=InputOptions(input=inputs, batch_size=batch_size),
        loss=LossKind.MSE if targets is not None else LossKind.SUM,
        target=targets,
        **options,
    )
    report = api.inspect_module(module, opts)
    validate_report(report.to_dict())
    return report


def _reference_gradients(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Plain autograd on the whole batch: every gradient held, norms taken afterwards."""
    module.zero_grad(set_to_none=True)
    out = module(x)
    loss = (out - y).pow(2).sum() / out.numel()
    loss.backward()
    norms = {name: float(p.grad.norm()) for name, p in module.named_parameters()}  # type: ignore[union-attr]
    module.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("batch_size", [None, 5])
def test_lean_gradient_norms_equal_plain_autograd(tmp_path: Path, batch_size: int | None) -> None:
    """One micro-batch (reduced and freed as each gradient arrives) and three (accumulated, then
    reduced): the same norms as autograd holding every gradient of the whole batch."""
    model = blocks_net().eval()
    x = torch.randn(15, 12, generator=torch.Generator().manual_seed(1))
    y = torch.randn(15, 5, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    expected = _reference_gradients(model, x, y)
    report = _probe_file(model, tmp_path / "x.pt", tmp_path / "y.pt", batch_size=batch_size)
    assert report.probe.batches == (1 if batch_size is None else 3)
    rows = {row.name: row for row in report.layers if row.grad is not None}
    assert set(rows) == {"embed", "gate", "head"} | {f"blocks.{i}.{part}" for i in range(3) for part in ("norm", "fc")}
    for name, row in rows.items():
        want = math.sqrt(expected[f"{name}.weight"] ** 2 + expected[f"{name}.bias"] ** 2)
        assert row.grad is not None and row.grad.norm == pytest.approx(want, rel=1e-5), name
    # The caller's model is left as it was: no gradient survives the probe.
    assert all(p.grad is None for p in model.parameters())


def test_lean_gradients_of_a_tied_weight_are_reduced_once(tmp_path: Path) -> None:
    """An embedding shared with the output projection accumulates both uses before it is reduced."""
    model = tied().eval()
    tokens = torch.randint(0, 40, (6, 7), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "t.pt")
    report = _probe_file(model, tmp_path / "t.pt", None)
    model.zero_grad(set_to_none=True)
    out = model(tokens)
    (out.sum() / out.shape[0]).backward()
    shared = float(model.embed.weight.grad.norm())  # type: ignore[union-attr]
    rows = {row.name: row for row in report.layers}
    assert rows["embed"].grad is not None and rows["embed"].grad.norm == pytest.approx(shared, rel=1e-5)
    assert rows["out"].grad is not None and rows["out"].grad.norm == pytest.approx(shared, rel=1e-5)


class _Lookup(nn.Module):
    """A large table, looked up with repeats and a padding token, then a small head."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 24, padding_idx=0, dtype=dtype)
        self.head = nn.Linear(24, 3, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens)).float().mean(dim=1)


@pytest.mark.parametrize(
    ("dtype", "batch_size", "rel"),
    [(torch.float32, None, 1e-5), (torch.float32, 3, 1e-5), (torch.bfloat16, None, 2e-2)],
)
def test_embedding_gradients_are_the_looked_up_rows_and_equal_the_dense_norm(
    tmp_path: Path, dtype: torch.dtype, batch_size: int | None, rel: float
) -> None:
    """The table's gradient arrives sparse (no table-sized buffer), repeats and micro-batches summed
    before squaring: its norm is the dense autograd one. The caller's layer keeps its flag."""
    torch.manual_seed(4)
    model = _Lookup(dtype)
    tokens = torch.randint(0, 6, (9, 11), generator=torch.Generator().manual_seed(5))  # many repeats
    tokens[:, -2:] = 0  # the padding row gets no gradient either way
    torch.save(tokens, tmp_path / "t.pt")
    model.zero_grad(set_to_none=True)
    out = model(tokens)
    (out.sum() / out.shape[0]).backward()
    dense = model.embed.weight.grad
    assert dense is not None and not dense.is_sparse
    expected = float(dense.float().norm())
    model.zero_grad(set_to_none=True)
    seen: list[tuple[bool, int]] = []
    handle = model.embed.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append((p.grad.is_sparse, p.grad._values().numel() if p.grad.is_sparse else p.grad.numel()))  # type: ignore[union-attr]
    )
    try:
        report = _probe_file(model, tmp_path / "t.pt", None, batch_size=batch_size)
    finally:
        handle.remove()
    assert seen and all(sparse and size <= tokens.numel() * 24 for sparse, size in seen)
    row = next(r for r in report.layers if r.name == "embed")
    assert row.grad is not None and row.grad.norm == pytest.approx(expected, rel=rel)
    assert model.embed.sparse is False and model.embed.weight.grad is None


def test_gradients_are_freed_as_they_are_reduced() -> None:
    """While backward runs, at most one parameter holds a gradient at a time."""
    model = Wide(width=64, depth=6)
    live: list[int] = []

    def count(_: torch.Tensor) -> None:
        live.append(sum(1 for p in model.parameters() if p.grad is not None))

    # Registered before the probe's own hooks: they run first, so each sees the gradients that
    # earlier hooks have not freed.
    handles = [p.register_post_accumulate_grad_hook(count) for p in model.parameters()]
    try:
        api.inspect_module(model, ProbeOptions(inputs=InputOptions(input_shape=((4, 64),))))
    finally:
        for handle in handles:
            handle.remove()
    assert len(live) == 12 and max(live) == 1


def test_bf16_statistics_match_float32_within_bf16_resolution(tmp_path: Path) -> None:
    """The same weights in bfloat16 run in bfloat16; each row's statistics are those of the float32
    model up to bf16 rounding (8 significant bits: 2^-8 relative per rounding, a few roundings
    deep), and the report says which dtype ran."""
    from safetensors.torch import save_file

    reference = blocks_net().eval()
    half = blocks_net().eval().to(torch.bfloat16)
    save_file(half.state_dict(), str(tmp_path / "half.safetensors"))
    # The float32 reference holds exactly the bf16 values, so only the arithmetic differs.
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    save_file(reference.state_dict(), str(tmp_path / "full.safetensors"))
    load = api.LoadOptions(arch=f"{MODELS}:blocks_net")
    probe = ProbeOptions(inputs=InputOptions(input_shape=((32, 12),)), loss=LossKind.SUM)
    low = api.inspect(tmp_path / "half.safetensors", load=load, probe=probe)
    high = api.inspect(tmp_path / "full.safetensors", load=load, probe=probe)
    assert any(note.startswith("ran in bfloat16") for note in low.notes)
    assert not any(note.startswith("ran in") for note in high.notes)
    tolerance = 8 * 2.0**-8
    assert [r.name for r in low.layers] == [r.name for r in high.layers]
    for a, b in zip(low.layers, high.layers, strict=True):
        assert a.output.count == b.output.count
        assert a.output.mean is not None and b.output.mean is not None and b.output.var is not None
        spread = math.sqrt(b.output.var)
        assert abs(a.output.mean - b.output.mean) <= tolerance * (abs(b.output.mean) + spread), a.name
        assert a.output.var == pytest.approx(b.output.var, rel=2 * tolerance), a.name
        assert a.output_grad_norm == pytest.approx(b.output_grad_norm, rel=tolerance), a.name
        if b.grad is not None:
            assert a.grad is not None and a.grad.norm == pytest.approx(b.grad.norm, rel=tolerance), a.name
            assert a.grad.weight_norm == pytest.approx(b.grad.weight_norm, rel=1e-6), a.name  # same values
        assert a.dead == b.dead


def test_safetensors_are_memory_mapped_and_equal_to_the_package_reader(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from gradcheck_cli.model.stream import safetensors_mapped

    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    mapped = safetensors_mapped(tmp_path / "t.safetensors")
    expected = load_file(str(tmp_path / "t.safetensors"))
    assert set(mapped) == set(expected)
    for key, value in expected.items():
        assert mapped[key].dtype == value.dtype and mapped[key].shape == value.shape
        assert torch.equal(mapped[key], value), key
    # Writes stay private: the file is never modified.
    before = (tmp_path / "t.safetensors").read_bytes()
    mapped["f32"].add_(1.0)
    assert (tmp_path / "t.safetensors").read_bytes() == before


def test_a_checkpoint_is_assigned_not_copied_and_ties_survive(tmp_path: Path) -> None:
    """The weights the model runs on are the file's mapped pages (held once), tied parameters stay one
    tensor, and the probe gives what the same model loaded by copy gives."""
    from safetensors.torch import save_model

    from gradcheck_cli.model.torch_load import model_from_path

    source = tied()
    save_model(source, str(tmp_path / "tied.safetensors"))
    loaded = model_from_path(tmp_path / "tied.safetensors", arch=f"{MODELS}:tied").module
    assert type(loaded).__name__ == "Tied"  # the class of the --arch file, imported under its own name
    assert loaded.out.weight is loaded.embed.weight
    assert torch.equal(loaded.mix.weight, source.mix.weight)
    size = (tmp_path / "tied.safetensors").stat().st_size
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if line.rstrip().endswith("tied.safetensors")]
    assert mapped, "the checkpoint is not memory-mapped"
    starts_ends = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in mapped]
    pointer = loaded.mix.weight.data_ptr()
    assert any(start <= pointer < end for start, end in starts_ends) and size > 0


def test_a_model_too_big_even_for_the_lean_probe_is_refused_with_what_would_fit() -> None:
    from gradcheck_cli.errors import ProbeError

    model = Wide(width=256, depth=4)
    weights = sum(p.numel() for p in model.parameters()) * 4
    with pytest.raises(ProbeError) as info:
        api.inspect_module(model, ProbeOptions(inputs=InputOptions(input_shape=((4, 256),)), memory_budget=weights))
    assert "the weights and the largest gradient alone take" in info.value.message
    assert "torchrun" in info.value.hint and "`memory_budget`" in info.value.hint
    # The largest gradient is what the lean probe adds: a budget a little above weights + that fits.
    largest = 256 * 256 * 4
    report = api.inspect_module(
        model, ProbeOptions(inputs=InputOptions(input_shape=((4, 256),)), memory_budget=weights + largest + 64 * 1024)
    )
    assert report.probe.batches == 1


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch
    sys.path.insert(0, {root!r})
    from gradcheck_cli import api
    from gradcheck_cli.options import InputOptions
    from gradcheck_cli.options import ProbeOptions
    from tests._big_models import Wide

    def hwm_growth(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        status = open("/proc/self/status").read()
        before = int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1))
        fn()
        after = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        return (after - before) * 1024

    torch.set_num_threads(1)
    model = Wide()
    x = torch.randn(2, 1024)
    options = ProbeOptions(inputs=InputOptions(input_shape=((2, 1024),)))
    api.inspect_module(model, options)  # warm-up: lazily imported modules and one-off allocations

    def bare():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)

    bare()
    lean = hwm_growth(lambda: api.inspect_module(model, options))
    step = hwm_growth(bare)
    print(json.dumps({{"lean": lean, "bare": step}}))
""")


def test_lean_probe_peak_stays_far_below_the_gradients_it_measures(tmp_path: Path) -> None:
    """A model whose 50 MB of gradients dwarf its activations: the bare training step's peak grows
    by all of them, the probe's by about the largest one (4 MB) and its bookkeeping."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure the peak resident set")
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY_SCRIPT.format(root=str(ROOT)))
    # A fixed mmap threshold makes glibc return every large block to the system when it is freed, so
    # the resident set follows live memory (with its dynamic threshold, blocks freed by the warm-up
    # stay resident and hide the growth of whatever reuses them).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    gradients = sum(p.numel() for p in Wide().parameters()) * 4
    assert figures["bare"] >= 0.9 * gradients  # the yardstick does hold every gradient
    assert figures["lean"] <= 0.3 * gradients, figures


def test_activation_checkpointing_gives_the_same_rows() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    probe = ProbeOptions(inputs=InputOptions(batch_size=2, seq_len=8))
    plain = api.inspect_module(model, probe)
    checkpointed = api.inspect_module(
        model, ProbeOptions(inputs=InputOptions(batch_size=2, seq_len=8), activation_checkpointing=True)
    )
    assert not model.is_activation_checkpointing  # restored
    assert [r.name for r in plain.layers] == [r.name for r in checkpointed.layers]
    for a, b in zip(plain.layers, checkpointed.layers, strict=True):
        assert b.output.mean == pytest.approx(a.output.mean, rel=1e-5, abs=1e-7), a.name
        assert b.output_grad_norm == pytest.approx(a.output_grad_norm, rel=1e-4, abs=1e-9), a.name
        if a.grad is not None:
            assert b.grad is not None and b.grad.norm == pytest.approx(a.grad.norm, rel=1e-4), a.name


def test_activation_checkpointing_needs_a_transformers_model() -> None:
    from gradcheck_cli.errors import UsageError

    with pytest.raises(UsageError, match="activation_checkpointing"):
        api.inspect_module(
            blocks_net(), ProbeOptions(inputs=InputOptions(input_shape=((4, 12),)), activation_checkpointing=True)
        )


def test_torchrun_two_processes_give_the_rows_of_one(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 (gloo, FSDP2): each process runs half of every micro-batch; the
    merged report (written by rank 0 alone) has the rows and numbers of a single process."""
    pytest.importorskip("torch.distributed.fsdp")
    torch.save(blocks_net().state_dict(), tmp_path / "net.pt")
    args = [
        "inspect",
        str(tmp_path / "net.pt"),
        "--arch",
        f"{MODELS}:blocks_net",
        "--input-shape",
        "10,12",
        "--batches",
        "2",
        "--format",
        "json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "gradcheck_cli",
            *args,
            "-o",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = api.inspect(
        tmp_path / "net.pt",
        load=api.LoadOptions(arch=f"{MODELS}:blocks_net"),
        probe=ProbeOptions(inputs=InputOptions(input_shape=((10, 12),), batches=2)),
    ).to_dict()
    assert any("sharded with FSDP2 across 2 processes" in note for note in two["notes"])
    assert two["model"]["parameters"] == one["model"]["parameters"]
    assert two["probe"]["loss_value"] == pytest.approx(one["probe"]["loss_value"], rel=1e-5)
    assert [r["name"] for r in two["layers"]] == [r["name"] for r in one["layers"]]
    assert launched.stdout.count('"schema_version"') == 1  # rank 0 alone printed the report
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert b["shape"] == a["shape"] and b["params"] == a["params"], a["name"]
        for key in ("count", "nan", "inf"):
            assert b["output"][key] == a["output"][key], (a["name"], key)
        for key in ("mean", "var", "min", "max"):
            assert b["output"][key] == pytest.approx(a["output"][key], rel=1e-4, abs=1e-7), (a["name"], key)
        assert b["output_grad_norm"] == pytest.approx(a["output_grad_norm"], rel=1e-4), a["name"]
        assert b["dead"] == a["dead"] and b["saturation"] == a["saturation"], a["name"]
        if a["grad"] is not None:
            for key in ("norm", "weight_norm"):
                assert b["grad"][key] == pytest.approx(a["grad"][key], rel=1e-4), (a["name"], key)


@pytest.mark.slow
def test_bench_big_quick_runs(tmp_path: Path) -> None:
    """bench/big.py end to end on the tiny Llama configuration: generate, probe, bare step, table."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "big.py"),
            "--quick",
            "--workdir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "big_quick.json").read_text())
    assert rows[0]["probe"]["ok"] and rows[0]["bare"]["ok"]
    assert rows[0]["bare"]["gradient_bytes"] > 0
    assert "| llama-tiny |" in (tmp_path / "out" / "big_quick.md").read_text()


def test_device_auto_is_the_cpu_without_a_gpu() -> None:
    from gradcheck_cli.model.torch_load import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    report = api.inspect_module(blocks_net(), ProbeOptions(inputs=InputOptions(input_shape=((4, 12),)), device="auto"))
    assert report.probe.device.startswith(expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sums_of_squares_of_large_half_precision_tensors(dtype: torch.dtype) -> None:
    """Σx² of a 20M-element tensor against a float64 dot product of the same values: within bf16's
    resolution for bfloat16's row norms, float32 accumulation for float16."""
    from gradcheck_cli.probe.recorder import sum_of_squares

    values = (torch.randn(4999, 4001, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.01).to(dtype)
    flat = values.reshape(-1).double()
    expected = float(torch.dot(flat, flat))
    got = float(sum_of_squares(values))
    # bfloat16: 4880 rows of 4096, each row's norm rounded to bfloat16: 2^-8/sqrt(4880) ~ 6e-5.
    assert got == pytest.approx(expected, rel=2e-4 if dtype == torch.bfloat16 else 1e-5)
    odd = values[:, :4000]  # not contiguous: the plain path
    flat_odd = odd.reshape(-1).double()
    assert float(sum_of_squares(odd)) == pytest.approx(float(torch.dot(flat_odd, flat_odd)), rel=1e-3)


def test_large_bf16_outputs_are_reduced_in_bf16_within_its_resolution() -> None:
    """An output of 4M+ bfloat16 values on the CPU is reduced row by row in bfloat16, without a
    float32 copy: its mean, variance, extremes and dead units against float64 statistics of the
    very values the probe saw (captured by a hook of the test's own)."""
    from gradcheck_cli.probe import recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 4096), nn.ReLU(), nn.Linear(4096, 8)).to(torch.bfloat16)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            seen[name] = output.detach().double()

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_children()]
    try:
        report = api.inspect_module(
            model, ProbeOptions(inputs=InputOptions(input_shape=((1100, 32),)), loss=LossKind.SUM)
        )
    finally:
        for handle in handles:
            handle.remove()
    assert recorder._measured(torch.zeros(1100, 4096, dtype=torch.bfloat16)).dtype == torch.bfloat16  # no copy
    rows = {row.name: row for row in report.layers}
    for name in ("0", "1"):
        values, output = seen[name], rows[name].output
        assert output.count == values.numel() == 1100 * 4096
        assert output.min == float(values.min()) and output.max == float(values.max())
        std = float(values.std(unbiased=False))
        # Each row of 4096 is summed in float32 and rounded to bfloat16 (2^-9 relative, unbiased):
        # over 1100 rows the error is far below one bfloat16 step of the spread.
        assert output.mean is not None and abs(output.mean - float(values.mean())) <= 2.0**-8 * std / 8
        assert output.var == pytest.approx(float(values.var(unbiased=False)), rel=2.0**-8 / 4)
    dead = int((seen["1"] == 0).all(dim=0).sum())
    assert rows["1"].dead is not None and rows["1"].dead.units == dead
    flat = seen["0"].reshape(-1)
    as_bf16 = flat.to(torch.bfloat16).reshape(1100, 4096)
    # Rounding 1100 row sums of ~64 std each to 2^-9 gives an error of a few std; summing in
    # bfloat16 itself would be off by thousands.
    assert float(recorder.sum_of_elements(as_bf16)) == pytest.approx(float(flat.sum()), abs=64 * std)


def test_inspect_reads_each_loaded_weight_for_nan_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`inspect` loads with NaN/Inf weights refused, so the gate's scan that follows does not read
    the same tensors again (a pass over 2.2 GB on a 1B bf16 checkpoint). With `allow_nonfinite`
    (what `check` always loads with) the loader reads none and the scan reads them all, and still
    names the corrupt tensor."""
    from gradcheck_cli import torch_util
    from gradcheck_cli.options import LoadOptions

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    path = tmp_path / "mlp.pt"
    torch.save(model, path)
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point]
    reads: list[int] = []
    counted = torch_util.all_finite
    monkeypatch.setattr(torch_util, "all_finite", lambda t: reads.append(t.numel()) or counted(t))
    probe = ProbeOptions(inputs=InputOptions(input_shape=((4, 8),)))
    api.inspect(path, load=LoadOptions(trust_pickle=True), probe=probe)
    assert sorted(reads) == sorted(t.numel() for t in tensors)

    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    torch.save(model, path)
    reads.clear()
    report = api.check(path, load=LoadOptions(trust_pickle=True), probe=probe)
    assert sorted(reads) == sorted(t.numel() for t in tensors)
    assert any("2.weight" in finding.message for finding in report.findings)
