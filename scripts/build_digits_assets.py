"""Convert scikit-learn's 8x8 handwritten digits into the classifier demo's data files.

The classifier demo (`abkd-train-classifier` with no arguments) must run offline and must not
depend on scikit-learn, so this script converts the data set once into files shipped in
`abkd_trainer/demo_assets/digits/`:

- `train.parquet`, `test.parquet`: an `image` column (8x8 grayscale PIL images, PNG-encoded,
  pixel value `round(v * 255 / 16)` of the original 0..16 counts) and a `label` column
  (`ClassLabel` with the names "0".."9"); a stratified split, fixed by `--seed`;
- `README.md`: where the data comes from and its licence (CC BY 4.0);
- `manifest.json`: the arguments, split sizes and per-class counts.

scikit-learn is needed only here. Install it outside the project's environment, e.g.

    .venv/bin/pip install --target /tmp/sk scikit-learn
    PYTHONPATH=/tmp/sk .venv/bin/python scripts/build_digits_assets.py

Load the result with `datasets`:

    load_dataset("parquet", data_files={"train": ".../train.parquet", "test": ".../test.parquet"})
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "abkd_trainer" / "demo_assets" / "digits"
CLASS_NAMES = [str(digit) for digit in range(10)]
MAX_COUNT = 16  # the digits' pixels count "on" pixels in 4x4 blocks: 0..16

LICENCE_NOTE = """# The 8x8 handwritten digits (classifier demo data)

`train.parquet` and `test.parquet` hold the 1797 images of scikit-learn's `load_digits()`
data set, converted by `scripts/build_digits_assets.py` (pixel counts 0..16 scaled to 0..255,
8x8 grayscale PNG; labels "0".."9"; a stratified split with seed {seed}: {num_train} training
and {num_test} test images).

Source: "Optical Recognition of Handwritten Digits" by E. Alpaydin and C. Kaynak (1998), UCI
Machine Learning Repository,
https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits
(scikit-learn ships its 1797-image test part as `sklearn.datasets.load_digits`).

Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/. The conversion changes the format (PNG in
Parquet) and the pixel scale, and splits the images into training and test sets; it changes no
image content.

The teacher in `teacher/` was trained on `train.parquet` by `scripts/train_digits_teacher.py`.
"""


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The images `(1797, 8, 8)` (0..16 counts) and labels `(1797,)` of `load_digits()`.

    Raises:
        SystemExit: when scikit-learn is not importable, with how to install it for this build.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "This build script needs scikit-learn (the demo itself does not). Install it outside "
            "the project: `pip install --target /tmp/sk scikit-learn`, then run "
            "`PYTHONPATH=/tmp/sk python scripts/build_digits_assets.py`."
        ) from error
    digits = load_digits()
    return np.asarray(digits.images), np.asarray(digits.target)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a stratified train/test split: each class gives `test_fraction` of its rows.

    Args:
        labels: `(N,)` integer class ids.
        test_fraction: in (0, 1); each class contributes `round(test_fraction * count)` rows
            to the test set.
        seed: seeds the per-class shuffles (numpy's PCG64).

    Returns:
        The sorted train and test indices (disjoint, together all of `range(N)`).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(round(test_fraction * len(rows)))
        test.append(rows[:num_test])
        train.append(rows[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_png(counts: np.ndarray) -> bytes:
    """An `(8, 8)` array of 0..16 counts as the bytes of an 8-bit grayscale PNG (0..255)."""
    from PIL import Image

    pixels = np.rint(counts.astype(np.float64) * 255.0 / MAX_COUNT).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build_split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
    """A `datasets.Dataset` with `image` (PIL) and `label` (ClassLabel "0".."9") columns."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES)})
    return Dataset.from_dict(
        {
            "image": [{"bytes": to_png(images[row]), "path": None} for row in rows],
            "label": [int(labels[row]) for row in rows],
        },
        features=features,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, labels = load_sklearn_digits()
    train_rows, test_rows = stratified_split(labels, args.test_fraction, args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": train_rows, "test": test_rows}
    for split, rows in splits.items():
        build_split(images, labels, rows).to_parquet(str(args.output_dir / f"{split}.parquet"))
    manifest = {
        "built_by": "scripts/build_digits_assets.py",
        "source": "sklearn.datasets.load_digits (UCI Optical Recognition of Handwritten Digits)",
        "licence": "CC BY 4.0",
        "arguments": {"test_fraction": args.test_fraction, "seed": args.seed},
        "class_names": CLASS_NAMES,
        "split_sizes": {split: len(rows) for split, rows in splits.items()},
        "class_counts": {
            split: np.bincount(labels[rows], minlength=10).tolist()
            for split, rows in splits.items()
        },
    }
    (args.output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (args.output_dir / "README.md").write_text(
        LICENCE_NOTE.format(seed=args.seed, num_train=len(train_rows), num_test=len(test_rows))
    )
    print(f"Wrote {len(train_rows)} training and {len(test_rows)} test images to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
