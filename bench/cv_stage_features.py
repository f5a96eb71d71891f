"""Linear probes on the inner stages of a frozen ImageNet encoder, in the folds of `lymphoma cv`: each whole image
(Reinhard by image, as the config normalises it; optionally resized by ``xF``) goes once through the encoder,
the output of each of its stages 1 to 4 (strides 4 to 32) is averaged over the image, and the averages side by
side are one logistic regression's input, the reference baseline's protocol (C chosen by an inner case-grouped CV
of the training cases), beside the baseline's colour/texture features, over the same fold assignments as
`lymphoma cv cv.repeats=R`, each compared with the baseline assignment by assignment (``paired``). The final
embedding that `lymphoma features` writes is the encoder's last, ImageNet-specific layer; these are the layers
below it, and the whole image rather than the mean of its tiles.

    .venv/bin/python bench/imagenet_weights.py --variant 0 --out weights/tf_efficientnet_lite0.in1k.safetensors
    .venv/bin/python bench/cv_stage_features.py -c configs/lymphoma-lowres.yaml \\
        lite0=tf_efficientnet_lite0:weights/tf_efficientnet_lite0.in1k.safetensors \\
        lite0-x2=tf_efficientnet_lite0:weights/tf_efficientnet_lite0.in1k.safetensors:2 \\
        [--beside-baseline lite0-x2] [--repeats 30] [--out bench/results/cv-stage-features-30.json]

An encoder spec is ``name=timm architecture:weight file[:resize factor]``; timm's ``tf_`` ports take pixels scaled
to [-1, 1] (mean and std 0.5), which is what this script gives every encoder.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from cv_embeddings import paired, scores
from PIL import Image

from common import emit
from jobs.baseline import load_cohort
from jobs.run_folder import open_run
from lymphoma.backbones import read_weight_file
from lymphoma.crossval import grouped_folds
from lymphoma.images import read_rgb
from lymphoma.stain import StainNormalizer, fit_target

STAGES = (1, 2, 3, 4)


def stage_encoder(architecture: str, weights: str) -> torch.nn.Module:
    """The timm ``architecture`` cut into its stages, with the weights of ``weights`` (its head unused)."""
    import timm

    model = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=STAGES)
    missing, _ = model.load_state_dict(read_weight_file(weights), strict=False)
    if missing:
        raise SystemExit(f"{weights}: {len(missing)} tensors of {architecture}'s stages missing (first: {missing[0]})")
    return model.eval()


def normalised_image(path: str, normalizer: StainNormalizer | None, factor: float) -> torch.Tensor:
    """One image as the encoder takes it: Reinhard by image, resized by ``factor``, ``[1, 3, H, W]`` in [-1, 1]."""
    pixels = read_rgb(path)
    if normalizer is not None:
        pixels = normalizer.apply(pixels[None], normalizer.image_statistics(pixels))[0]
    if factor != 1:
        h, w = pixels.shape[:2]
        size = (round(w * factor), round(h * factor))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def stage_features(spec: str, paths: list[str], normalizer: StainNormalizer | None) -> np.ndarray:
    """Every image's stage averages ``[N, sum of stage widths]`` under the encoder that ``spec`` names."""
    architecture, weights, *factor = spec.split(":")
    model, start = stage_encoder(architecture, weights), time.perf_counter()
    rows = []
    with torch.inference_mode():
        for path in paths:
            stages = model(normalised_image(path, normalizer, float(factor[0]) if factor else 1.0))
            rows.append(torch.cat([s.mean((2, 3))[0] for s in stages]).numpy())
    print(f"{spec}: {len(rows)} images in {time.perf_counter() - start:.0f} s", flush=True)
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("encoders", nargs="+", help="name=timm architecture:weight file[:resize factor]")
    parser.add_argument("--beside-baseline", nargs="*", default=[], help="encoder names also joined with the "
                        "baseline's colour/texture features as one regression's input")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = open_run(args.config)
    inputs, cv = run.inputs(), run.config.cv
    assignments = [grouped_folds(inputs.records, cv.folds, cv.seed + r) for r in range(args.repeats)]
    cohort = load_cohort(inputs.records, inputs.classes, run.dir / "baseline")
    target = fit_target(run.config.stain)
    normalizer = StainNormalizer(target) if target is not None else None
    specs = dict(spec.split("=", 1) for spec in args.encoders)
    methods = {"baseline (colour/texture)": cohort}
    for name, spec in specs.items():
        features = stage_features(spec, cohort.paths, normalizer)
        methods[name] = replace(cohort, features=features)
        if name in args.beside_baseline:
            methods[f"{name}+baseline"] = replace(cohort, features=np.hstack([features, cohort.features]))
    results = {name: scores(c, assignments, cv.seed, 0) for name, c in methods.items()}
    for name in list(methods)[1:]:
        results[name]["paired"] = paired(results[name], results["baseline (colour/texture)"])
    emit({"config": args.config, "encoders": specs, "stages": STAGES, "images": len(inputs.records),
          "folds": cv.folds, "seeds": [cv.seed + r for r in range(args.repeats)], "methods": results}, args.out)


if __name__ == "__main__":
    main()
