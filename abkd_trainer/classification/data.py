"""Classification datasets for `abkd-train-classifier`: find the columns, check and encode labels.

The command loads `--dataset_name` (a Hub id, a local `.csv`/`.json`/`.jsonl`/`.parquet` file, a
`save_to_disk` folder, or a folder of images or audio files, which `datasets` reads as
`imagefolder` / `audiofolder` with one subfolder per class); this module turns the splits into
what `ABKDClassifierTrainer` and its `ClassifierDistillationCollator` need:

- one input column, renamed to the name the collator reads: `image` (from `image`, `img`, or the
  column given with `--input_column`), `text` (`text`, `sentence`), `audio`, or already processed
  `pixel_values` / `input_values`;
- one label column `label` (from `label`, `labels` or `--label_column`) of class ids; class names
  given as strings are encoded as a `ClassLabel`, in the teacher's order when the teacher names
  those classes;
- class ids in range, and a held-out split (`--dataset_test_size` splits one off the training
  rows, stratified by class, when the dataset has none).

Every error names the columns or splits found and the flag that fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from abkd_trainer.core.objective import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

__all__ = [
    "INPUT_COLUMNS",
    "LABEL_COLUMNS",
    "ClassificationColumns",
    "ClassificationSplits",
    "align_dataset_labels",
    "check_label_range",
    "dataset_class_names",
    "encode_string_labels",
    "find_classification_columns",
    "load_processing_class",
    "normalize_columns",
    "prepare_classification_splits",
    "same_preprocessing",
]

# Accepted input columns by modality, in order of preference; the first name is the one the
# collator reads (processed `pixel_values` / `input_values` are stacked as they are).
INPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "img", "pixel_values"),
    "text": ("text", "sentence"),
    "audio": ("audio", "input_values"),
}
LABEL_COLUMNS = ("label", "labels")
PROCESSED_COLUMNS = ("pixel_values", "input_values")
_FIX_INPUT = (
    "Expected an image column (`image`, `img` or `pixel_values`), a text column (`text` or "
    "`sentence`) or an audio column (`audio` or `input_values`); name yours with "
    "--input_column COLUMN."
)


@dataclass(frozen=True)
class ClassificationColumns:
    """Where a dataset keeps its inputs and labels.

    Attributes:
        input: the input column as found in the dataset.
        label: the label column as found in the dataset.
        modality: `"image"`, `"text"` or `"audio"`.
    """

    input: str
    label: str
    modality: str

    @property
    def normalized_input(self) -> str:
        """The input column's name after `normalize_columns` (what the collator reads)."""
        return self.input if self.input in PROCESSED_COLUMNS else self.modality


@dataclass
class ClassificationSplits:
    """The prepared splits and what was found in them.

    Attributes:
        train: the training split (`label` and the normalised input column).
        test: the held-out split, or None when there is none and none was asked for.
        columns: the columns found in the raw training split.
        class_names: the class names in id order (`ClassLabel` names), or None when the labels
            are bare ids.
    """

    train: Dataset
    test: Dataset | None
    columns: ClassificationColumns
    class_names: tuple[str, ...] | None


def find_classification_columns(
    column_names: Sequence[str],
    *,
    input_column: str | None = None,
    label_column: str | None = None,
    where: str = "The dataset",
) -> ClassificationColumns:
    """The input and label columns among `column_names`.

    Args:
        column_names: the dataset's columns.
        input_column: the input column named by the user (`--input_column`); None looks for
            the usual names (`INPUT_COLUMNS`).
        label_column: the label column named by the user (`--label_column`); None looks for
            the usual names (`LABEL_COLUMNS`).
        where: how to name the dataset in messages.

    Returns:
        The input and label columns as found, and the input's modality.

    Raises:
        ValueError: a named column is missing, no column (or several) could hold the inputs,
            or there is no label column; the message lists the columns found and the fix.
    """
    columns = list(column_names)
    found = f"{where} has the columns {sorted(columns)}"
    if input_column is not None:
        if input_column not in columns:
            raise ValueError(f"{found}; --input_column {input_column!r} is not among them.")
        modality = next(
            (kind for kind, names in INPUT_COLUMNS.items() if input_column in names), None
        )
        modality = modality or _modality_from_name(input_column)
    else:
        candidates = [
            (name, kind)
            for kind, names in INPUT_COLUMNS.items()
            for name in names
            if name in columns
        ]
        if not candidates:
            raise ValueError(f"{found}; none of them holds the model inputs. {_FIX_INPUT}")
        if len(candidates) > 1:
            raise ValueError(
                f"{found}; several could hold the model inputs "
                f"({', '.join(name for name, _ in candidates)}). Choose one with "
                "--input_column COLUMN."
            )
        input_column, modality = candidates[0]
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"{found}; --label_column {label_column!r} is not among them.")
    else:
        label_column = next((name for name in LABEL_COLUMNS if name in columns), None)
        if label_column is None:
            raise ValueError(
                f"{found}; none of them holds the class of each example (`label` or `labels`). "
                "Name yours with --label_column COLUMN."
            )
    return ClassificationColumns(input_column, label_column, modality)


def _modality_from_name(column: str) -> str:
    """The modality of a user-named input column that is none of the usual names."""
    lowered = column.lower()
    if any(word in lowered for word in ("audio", "speech", "wav", "sound")):
        return "audio"
    if any(word in lowered for word in ("text", "sentence", "review", "content", "question")):
        return "text"
    return "image"


def normalize_columns(dataset: Dataset, columns: ClassificationColumns) -> Dataset:
    """`dataset` with its input column renamed to `columns.normalized_input` and its label column
    to `label` (other columns are kept; the trainer drops what no model or collator reads).

    Args:
        dataset: one split.
        columns: its columns, from `find_classification_columns`.

    Raises:
        ValueError: a new name is already taken by another column.
    """
    renames = {columns.input: columns.normalized_input, columns.label: "label"}
    renames = {old: new for old, new in renames.items() if old != new}
    clashes = [new for new in renames.values() if new in dataset.column_names]
    if clashes:
        raise ValueError(
            f"Cannot rename {sorted(renames)} to {sorted(renames.values())}: the dataset already "
            f"has {clashes}. Remove or rename those columns, or choose them with --input_column / "
            "--label_column."
        )
    return dataset.rename_columns(renames) if renames else dataset


def dataset_class_names(dataset: Dataset, label_column: str = "label") -> tuple[str, ...] | None:
    """The `ClassLabel` names of the label column, in id order, or None for bare ids.

    Args:
        dataset: one split.
        label_column: the column of class ids.
    """
    from datasets import ClassLabel

    feature = dataset.features.get(label_column)
    return tuple(feature.names) if isinstance(feature, ClassLabel) else None


def encode_string_labels(
    splits: Mapping[str, Dataset], preferred_names: Sequence[str] | None = None
) -> dict[str, Dataset]:
    """Splits whose `label` column holds class names (strings), cast to one shared `ClassLabel`.

    The class order is `preferred_names` (the teacher's) when they cover every name found, else
    the sorted names of all splits together, so that every split numbers the classes alike.
    Splits with integer or `ClassLabel` labels are returned unchanged.

    Args:
        splits: the splits by name, each with a `label` column.
        preferred_names: the teacher's class names in id order, or None.

    Raises:
        ValueError: labels that are neither class ids nor class names (floats, lists: regression
            or multi-label data, which the trainer does not distil).
    """
    from datasets import ClassLabel

    kinds = {name: _label_kind(split, name) for name, split in splits.items()}
    strings = [name for name, kind in kinds.items() if kind == "string"]
    if not strings:
        return dict(splits)
    found = sorted({label for name in strings for label in splits[name].unique("label")})
    names = (
        list(preferred_names) if preferred_names and set(found) <= set(preferred_names) else found
    )
    encoded = dict(splits)
    for name in strings:
        encoded[name] = splits[name].cast_column("label", ClassLabel(names=names))
    return encoded


def _label_kind(dataset: Dataset, split: str) -> str:
    from datasets import ClassLabel, Value

    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return "classlabel"
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return "string"
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        return "int"
    raise ValueError(
        f"The labels of the {split!r} split are {feature}, not class ids (integers) or class "
        "names (strings). ABKDClassifierTrainer distils single-label classifiers: one class per "
        "example (regression and multi-label data are not supported)."
    )


def align_dataset_labels(
    dataset: Dataset, model_names: Sequence[str], *, where: str = "The dataset"
) -> Dataset:
    """Renumber a `ClassLabel` column so that its ids follow `model_names` (the student's classes).

    A dataset numbering the same classes in another order is remapped; one in the same order, or
    without class names, is returned unchanged.

    Args:
        dataset: one split with a `label` column.
        model_names: the student's class names in id order.
        where: how to name the dataset in messages.

    Raises:
        ValueError: the dataset names a class the model lacks (or the other way round).
    """
    from datasets import ClassLabel

    names = dataset_class_names(dataset)
    if names is None or tuple(names) == tuple(model_names):
        return dataset
    missing = [name for name in names if name not in model_names]
    extra = [name for name in model_names if name not in names]
    if missing or extra:
        raise ValueError(
            f"{where} names the classes {list(names)}, the student {list(model_names)}: "
            + (f"{missing[0]!r} is not a class of the student. " if missing else "")
            + (f"The student's {extra[0]!r} is not in the dataset. " if extra else "")
            + "Train on data with the student's classes, or give the student the dataset's "
            "classes (a student loaded by name gets them with --ignore_mismatched_sizes)."
        )
    new_id = [list(model_names).index(name) for name in names]

    def renumber(batch: dict[str, list[int]]) -> dict[str, list[int]]:
        return {"label": [new_id[label] if label >= 0 else label for label in batch["label"]]}

    features = dataset.features.copy()
    features["label"] = ClassLabel(names=list(model_names))
    return dataset.map(renumber, batched=True, features=features, desc="Renumbering classes")


def check_label_range(dataset: Dataset, num_labels: int, *, where: str = "The dataset") -> None:
    """Raise unless every label is a class id in `[0, num_labels)` (or `-100`, not counted).

    Args:
        dataset: one split with a `label` column.
        num_labels: the models' number of classes.
        where: how to name the dataset in messages.

    Raises:
        ValueError: naming the first label out of range, the number of classes and the fix.
    """
    import numpy as np

    labels = np.asarray(dataset["label"])
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))]
    if bad.size:
        raise ValueError(
            f"{where} has the label {int(bad[0])} ({bad.size} labels out of range), but the models "
            f"have {num_labels} classes (ids 0 to {num_labels - 1}). Check --label_column, or use "
            "a teacher and student with the dataset's number of classes"
            + (
                " (-1 usually marks an unlabelled test split, e.g. GLUE's: evaluate on another "
                "split with --dataset_test_split validation)."
                if int(bad[0]) == -1
                else "."
            )
        )


def prepare_classification_splits(
    datasets: DatasetDict | Mapping[str, Dataset],
    *,
    train_split: str = "train",
    test_split: str = "test",
    test_size: float | None = None,
    input_column: str | None = None,
    label_column: str | None = None,
    preferred_class_names: Sequence[str] | None = None,
    seed: int = 0,
    source: str | None = None,
) -> ClassificationSplits:
    """The training and held-out splits of a loaded dataset, normalised for the trainer.

    Args:
        datasets: the loaded splits.
        train_split: the name of the training split (`--dataset_train_split`).
        test_split: the name of the held-out split (`--dataset_test_split`).
        test_size: when the dataset has no `test_split`, hold out this fraction (or, when > 1,
            this number) of the training rows, stratified by class; None keeps all rows for
            training and gives no test split.
        input_column: the input column, or None to find it (see
            `find_classification_columns`).
        label_column: the label column, or None to find it.
        preferred_class_names: the teacher's class names, used to number string labels.
        seed: seeds the held-out split.
        source: where the data came from (a file or Hub id), named in messages.

    Raises:
        ValueError: a missing split, missing columns, or labels that are not class ids.
    """
    where = f" ({source})" if source else ""
    if train_split not in datasets:
        raise ValueError(
            f"The dataset{where} has no {train_split!r} split for training (splits: "
            f"{sorted(datasets)}). Choose one with --dataset_train_split."
        )
    columns = find_classification_columns(
        datasets[train_split].column_names,
        input_column=input_column,
        label_column=label_column,
        where=f"The {train_split!r} split{where}",
    )
    splits = {train_split: normalize_columns(datasets[train_split], columns)}
    if test_split in datasets:
        splits[test_split] = normalize_columns(datasets[test_split], columns)
    splits = encode_string_labels(splits, preferred_class_names)
    if test_split not in splits and test_size is not None:
        held_out = splits[train_split].train_test_split(
            test_size=test_size,
            seed=seed,
            stratify_by_column="label" if dataset_class_names(splits[train_split]) else None,
        )
        splits = {train_split: held_out["train"], test_split: held_out["test"]}
    return ClassificationSplits(
        train=splits[train_split],
        test=splits.get(test_split),
        columns=columns,
        class_names=dataset_class_names(splits[train_split]),
    )


# ----------------------------------------------------------------------------- processors


def load_processing_class(name_or_path: str, modality: str, *, who: str) -> Any:
    """The image processor, tokenizer or feature extractor saved with a model.

    Args:
        name_or_path: a Hub id or a local directory.
        modality: `"image"`, `"text"` or `"audio"` (from `find_classification_columns`).
        who: `"student"` or `"teacher"`, for messages.

    Raises:
        ValueError: when `name_or_path` has no processor of that kind, naming the flag that
            gives one.
    """
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    loaders = {
        "image": AutoImageProcessor,
        "text": AutoTokenizer,
        "audio": AutoFeatureExtractor,
    }
    flag = "--processor_name_or_path" if who == "student" else "--teacher_processor_name_or_path"
    try:
        return loaders[modality].from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"Cannot load the {who}'s {modality} preprocessing from {name_or_path!r} "
            f"({type(error).__name__}: {error}). Point {flag} at a model or folder that has "
            "one (preprocessor_config.json, or tokenizer files for text)."
        ) from error


def same_preprocessing(first: Any, second: Any) -> bool:
    """Whether two processors turn the same raw input into the same model inputs.

    Tokenizers are compared by class and vocabulary, image processors and feature extractors by
    their settings (`to_dict()`, without the fields that only name the class).

    Args:
        first: a tokenizer, image processor or feature extractor.
        second: another one.
    """
    if type(first) is not type(second):
        return False
    if hasattr(first, "get_vocab"):
        return first.get_vocab() == second.get_vocab()
    naming = {"image_processor_type", "feature_extractor_type", "processor_class"}

    def settings(processor: Any) -> dict:
        return {k: v for k, v in processor.to_dict().items() if k not in naming}

    return settings(first) == settings(second)
