"""Loading and checking the datasets ABKD distils on, with errors that say what to fix.

`load_dataset_from_name` reads `--dataset_name` (a local file, a `save_to_disk`
folder or a Hub id). Local files are checked first (`check_data_file`): a path that
does not exist fails at once instead of being tried as a Hub id, and empty files, bytes that
are not UTF-8 and broken JSON Lines are reported with the file and line.

`check_sft_columns` and `check_supervised_tokens` are the checks
`ABKDTrainer` runs at construction, before and after SFTTrainer prepares the datasets: a
dataset in none of SFTTrainer's formats, an empty one, or one where no token is supervised
fails there with the formats accepted, not with a `KeyError` or `num_samples=0` later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.lm.batches import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset

# Local files `--dataset_name` may point at, by suffix, and the `datasets` builder that reads them.
DATA_FILE_BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
# Formats read as text, which must be UTF-8.
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")

SFT_FORMATS = (
    "SFTTrainer's dataset formats are: a `text` column (language modelling; another column "
    "with `dataset_text_field`), `prompt` and `completion` columns (strings, or lists of chat "
    'messages), a `messages` column (a conversation: a list of {"role": ..., "content": ...}), '
    "or already tokenized `input_ids`; a `formatting_func` may build the text from other columns."
)
_READ_CHUNK_BYTES = 1 << 20


class DatasetFileError(ValueError):
    """A local dataset file cannot be read as a dataset; the message names file and line."""


# ----------------------------------------------------------------------------- loading


def load_dataset_from_name(
    name: str,
    *,
    config_name: str | None = None,
    streaming: bool = False,
    test_file: str | None = None,
    test_split: str = "test",
) -> DatasetDict:
    """Load `--dataset_name`: a local data file, a `save_to_disk` directory, or a Hub id.

    A single local file becomes the `train` split (`test_file`, when given, the
    `test_split` split); a saved `Dataset` becomes `train`; a saved `DatasetDict` keeps
    its splits.

    Raises:
        FileNotFoundError: `name` (or `test_file`) looks like a local path that does not
            exist; no Hub lookup is attempted.
        DatasetFileError: a local file is empty, not UTF-8, not valid JSON (Lines), or has no
            rows.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {name!r}: local dataset files must end in "
                f"{', '.join(sorted(DATA_FILE_BUILDERS))}; or pass a directory saved with "
                "`save_to_disk`, or a Hub dataset id."
            )
        files = {"train": path}
        if test_file is not None:
            files[test_split] = _require_local_path(test_file, "--dataset_test_file")
        for file in files.values():
            check_data_file(file)
        datasets = {
            split: _load_data_file(load_dataset, builder, file, streaming)
            for split, file in files.items()
        }
        return DatasetDict(datasets) if not streaming else _iterable_dict(datasets)
    if test_file is not None:
        raise ValueError("`dataset_test_file` only applies when `dataset_name` is a local file.")
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
            loaded = load_from_disk(str(path))
            return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded
        # A directory of data files that `load_dataset` understands.
        return load_dataset(str(path), name=config_name, streaming=streaming)
    if looks_like_local_path(name):
        _require_local_path(name, "--dataset_name")
    return load_dataset(name, name=config_name, streaming=streaming)


def _iterable_dict(datasets: Mapping[str, Any]) -> Any:
    from datasets import IterableDatasetDict

    return IterableDatasetDict(datasets)


def _load_data_file(
    load_dataset: Callable[..., Any], builder: str, path: Path, streaming: bool
) -> Dataset | IterableDataset:
    """One local file as a split; read errors are traced to the file and line."""
    try:
        dataset = load_dataset(
            builder, data_files={"train": str(path)}, split="train", streaming=streaming
        )
    except Exception as error:
        problem = find_json_problem(path) if builder == "json" else None
        if problem is None:
            raise DatasetFileError(
                f"Cannot read {path}: {type(error).__name__}: {error}"
            ) from error
        raise DatasetFileError(problem) from error
    if not streaming and len(dataset) == 0:
        raise DatasetFileError(f"{path} holds no rows: the dataset is empty.")
    return dataset


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path (a Hub id is `name` or `namespace/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).suffix.lower() in DATA_FILE_BUILDERS or name.startswith(("~", ".", os.sep)):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _require_local_path(name: str, flag: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        parent = path.parent
        hint = (
            f" ({parent} holds: {', '.join(sorted(p.name for p in parent.iterdir())[:10])})"
            if parent.is_dir() and str(parent) not in ("", ".")
            else ""
        )
        raise FileNotFoundError(
            f"{flag} {name}: no such file or directory (looked for {path.resolve()}){hint}. "
            "Local datasets are .json/.jsonl/.parquet/.csv files or `save_to_disk` folders; a "
            "Hub dataset id has the form `name` or `namespace/name`."
        )
    return path


# ----------------------------------------------------------------------------- file checks


def check_data_file(path: str | Path) -> None:
    """Fail early, naming `path`, if a local data file is empty or (text formats) not UTF-8.

    Reads the file once, in 1 MiB chunks.

    Raises:
        DatasetFileError: the file is empty (or only whitespace), or holds bytes that are not
            UTF-8 (the message gives the line and byte offset).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise DatasetFileError(f"{path} is empty (0 bytes): the dataset has no rows.")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return
    has_content = False
    for data in _utf8_chunks(path):
        has_content = has_content or bool(data.strip())
    if not has_content:
        raise DatasetFileError(f"{path} holds only whitespace: the dataset has no rows.")


def _utf8_chunks(path: Path) -> Iterator[bytes]:
    """Yield the bytes of `path` in chunks that end on character boundaries, checking UTF-8.

    Raises:
        DatasetFileError: at the first byte that is not UTF-8.
    """
    offset, line, carry = 0, 1, b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_READ_CHUNK_BYTES)
            data = carry + chunk
            if not data:
                return
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as error:
                # A character split by the chunk boundary is completed by the next chunk.
                truncated = error.end == len(data) and len(data) - error.start < 4
                if not (chunk and truncated):
                    bad_line = line + data.count(b"\n", 0, error.start)
                    raise DatasetFileError(
                        f"{path}, line {bad_line}: not UTF-8 text (byte "
                        f"0x{data[error.start]:02x} at byte offset {offset + error.start}). "
                        "Datasets must be UTF-8; convert the file, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > converted{path.suffix}`."
                    ) from error
                data, carry = data[: error.start], data[error.start :]
            yield data
            offset += len(data)
            line += data.count(b"\n")
            if not chunk:
                return


def find_json_problem(path: str | Path) -> str | None:
    """Describe the first problem of a JSON or JSON Lines file (syntax, no rows), or None.

    JSON Lines (`.jsonl`, or a `.json` file not starting with `[`) must hold one JSON
    object per non-blank line; a `.json` array must parse as a whole.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                return (
                    f"{path}, line {error.lineno}, column {error.colno}: not valid JSON "
                    f"({error.msg}). A .json dataset is an array of objects, or one object per "
                    "line (JSON Lines)."
                )
        else:
            return f"{path} holds no rows: the dataset is empty." if document == [] else None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return (
                f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg}). "
                "Each line of a JSON Lines file must be one JSON object, e.g. "
                '{"prompt": "...", "completion": "..."}.'
            )
        if not isinstance(row, dict):
            return (
                f"{path}, line {number}: a JSON {type(row).__name__}, not an object. Each line "
                'of a JSON Lines file must be one JSON object, e.g. {"prompt": "...", '
                '"completion": "..."}.'
            )
    return None


# ----------------------------------------------------------------------------- SFT checks


def check_sft_columns(
    dataset: Dataset | IterableDataset | None,
    *,
    name: str = "train_dataset",
    source: str | None = None,
    dataset_text_field: str = "text",
    formatting_func: Callable[..., Any] | None = None,
) -> None:
    """Raise unless `dataset` has rows and the columns of one of SFTTrainer's formats.

    Args:
        dataset: the raw dataset (before SFTTrainer's preparation); None is accepted.
        name: what the dataset is called in the message (`train_dataset`, `the test split`).
        source: where it came from (a file or Hub id), named in the message.
        dataset_text_field: SFTConfig's name of the text column.
        formatting_func: when given, it builds the text and no column is required.

    Raises:
        ValueError: naming the dataset, its columns, the missing ones and the accepted formats.
    """
    from datasets import Dataset

    if dataset is None:
        return
    where = f"{name} ({source})" if source else name
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"{where} is empty: it has no rows to distil on.")
    columns = dataset.column_names
    if formatting_func is not None or columns is None:  # (an IterableDataset may not know them)
        return
    columns = set(columns)
    if "input_ids" in columns:
        return
    if "prompt" in columns or "completion" in columns:
        missing = sorted({"prompt", "completion"} - columns)
    elif columns & {dataset_text_field, "messages", "conversations"}:
        return
    else:
        missing = [dataset_text_field, "messages", "prompt + completion"]
    if not missing:
        return
    raise ValueError(
        f"{where} has the columns {sorted(columns)}; missing "
        + " or ".join(f"`{column}`" for column in missing)
        + f". {SFT_FORMATS}"
    )


def check_sft_datasets(
    train_dataset: Any, eval_dataset: Any, args: Any, formatting_func: Any = None
) -> None:
    """`check_sft_columns` for the train and every eval dataset a trainer receives."""
    if (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset", False):
        return  # the user prepares the data; SFTTrainer expects tokenized rows as they are
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        check_sft_columns(
            dataset,
            name=name,
            dataset_text_field=getattr(args, "dataset_text_field", "text"),
            formatting_func=formatting_func,
        )


def check_supervised_tokens(train_dataset: Any, eval_dataset: Any = None, args: Any = None) -> None:
    """Raise if a prepared dataset has no supervised next-token position (nothing to distil).

    Reads the `labels` SFTTrainer's preparation builds (`-100` where a token is not
    supervised); the position a label supervises is predicted from the one before it, so the
    first label of a row never counts. Stops at the first batch with a supervised token.
    Datasets without `labels` (prepared by the user) and iterable datasets are not checked.

    Raises:
        ValueError: naming the dataset and the usual causes.
    """
    from datasets import Dataset

    max_length = getattr(args, "max_length", None)
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names:
            continue
        if len(dataset) and _has_supervised_token(dataset):
            continue
        dropped = (
            " (SFTTrainer dropped every example as fully masked, which leaves it empty)"
            if len(dataset) == 0
            else ""
        )
        raise ValueError(
            f"{name} has no supervised token: after tokenization, completion or assistant "
            f"masks and truncation to max_length={max_length}, every label is -100{dropped}, "
            "so there is nothing to distil. Check that completions (or assistant turns) are "
            "not empty, that prompts leave room for them within max_length (raise it, or use "
            "truncation_mode='keep_end'), and, with assistant_only_loss, that the chat template "
            "marks assistant turns with {% generation %}."
        )


def _has_supervised_token(dataset: Dataset, batch_size: int = 256) -> bool:
    for batch in dataset.select_columns(["labels"]).iter(batch_size=batch_size):
        if any(label != IGNORE_INDEX for row in batch["labels"] for label in row[1:]):
            return True
    return False


def _named_datasets(train_dataset: Any, eval_dataset: Any) -> list[tuple[str, Any]]:
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, Mapping):
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    return [(name, dataset) for name, dataset in named if dataset is not None]
