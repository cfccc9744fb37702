"""Regenerate every sample checkpoint deterministically: python samples/make_samples.py

Each file stays well under 1 MB. The failure modes are built in, not trained in, so the
report of each sample is known in advance (samples/README.md).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402

SEED = 1234


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def sigmoid_saturated() -> nn.Module:
    model = models.SigmoidMLP()
    for layer in _linears(model):
        nn.init.normal_(layer.weight, 0.0, 1.0)  # N(0, 1): pre-activations of std ~sqrt(width)/2
        nn.init.zeros_(layer.bias)
    return model


def tanh_old_init() -> nn.Module:
    model = models.TanhMLP()
    for layer in _linears(model):
        models.old_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def relu_dead() -> nn.Module:
    model = models.ReLUMLP()
    for layer in _linears(model):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    # Kill units by construction: a large negative bias keeps their pre-activation below zero
    # for any input of ordinary scale, exactly what a too-large learning-rate step leaves behind.
    with torch.no_grad():
        for index, dead in ((0, 24), (2, 40), (4, 16)):
            layer = model.body[index]
            assert isinstance(layer, nn.Linear)
            layer.bias[:dead] = -100.0
    return model


def cnn_batchnorm() -> nn.Module:
    model = models.SmallCNN()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(100)
    return model.eval()


def relu_healthy() -> nn.Module:
    model = models.ReLUMLP()
    for layer in _linears(model):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.xavier_normal_(model.head.weight)
    return model


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model.eval(), (example,))
    torch.export.save(program, str(path))


def _script(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model.eval()).save(str(path))


def main(out: Path = HERE) -> list[Path]:
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    written: list[Path] = []
    example_vec = torch.randn(8, 32, generator=torch.Generator().manual_seed(SEED))
    example_img = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))

    torch.manual_seed(SEED)
    sigmoid = sigmoid_saturated()
    torch.save(sigmoid.state_dict(), out / "sigmoid_saturated.pt")
    written.append(out / "sigmoid_saturated.pt")

    torch.manual_seed(SEED)
    tanh = tanh_old_init()
    _export(tanh, example_vec, out / "tanh_old_init.pt2")
    written.append(out / "tanh_old_init.pt2")

    torch.manual_seed(SEED)
    dead = relu_dead()
    _script(dead, out / "relu_dead.torchscript.pt")
    written.append(out / "relu_dead.torchscript.pt")

    torch.manual_seed(SEED)
    cnn = cnn_batchnorm()
    save_file(cnn.state_dict(), str(out / "cnn_batchnorm.safetensors"))
    _export(cnn, example_img, out / "cnn_batchnorm.pt2")
    written += [out / "cnn_batchnorm.safetensors", out / "cnn_batchnorm.pt2"]

    torch.manual_seed(SEED)
    healthy = relu_healthy()
    torch.save(
        {"epoch": 10, "model_state_dict": {f"module.{k}": v for k, v in healthy.state_dict().items()}},
        out / "relu_healthy.ckpt",
    )
    _export(healthy, example_vec, out / "relu_healthy.pt2")
    written += [out / "relu_healthy.ckpt", out / "relu_healthy.pt2"]
    return written


if __name__ == "__main__":
    for path in main():
        print(f"{path.relative_to(HERE.parent)}  {path.stat().st_size:,} bytes")
