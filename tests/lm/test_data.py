"""Loading local datasets and the dataset checks: errors name the file, line, columns, formats."""

from __future__ import annotations

import json
import time

import pytest
from datasets import Dataset, DatasetDict
from testing_utils import build_abkd_trainer, build_prompt_completion_dataset

import abkd_trainer.lm.data as data
from abkd_trainer.lm.data import (
    SFT_FORMATS,
    DatasetFileError,
    check_data_file,
    check_sft_columns,
    check_supervised_tokens,
    find_json_problem,
    load_dataset_from_name,
)


def _rows(n: int = 4) -> list[dict[str, str]]:
    return build_prompt_completion_dataset(n).to_list()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_a_local_data_file_becomes_the_train_split(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(_rows())
    {
        ".jsonl": lambda: dataset.to_json(path, lines=True),
        ".json": lambda: path.write_text(json.dumps(_rows())),
        ".parquet": lambda: dataset.to_parquet(path),
        ".csv": lambda: dataset.to_csv(path, index=False),
    }[suffix]()

    loaded = load_dataset_from_name(str(path))

    assert list(loaded) == ["train"]
    assert loaded["train"].to_list() == _rows()


def test_a_test_file_becomes_the_named_test_split(tmp_path):
    Dataset.from_list(_rows(4)).to_json(tmp_path / "train.jsonl")
    Dataset.from_list(_rows(2)).to_json(tmp_path / "dev.jsonl")
    loaded = load_dataset_from_name(
        str(tmp_path / "train.jsonl"), test_file=str(tmp_path / "dev.jsonl"), test_split="dev"
    )
    assert (loaded["train"].num_rows, loaded["dev"].num_rows) == (4, 2)


def test_saved_datasets_directories_load_with_their_splits(tmp_path):
    DatasetDict(
        {"train": Dataset.from_list(_rows(4)), "test": Dataset.from_list(_rows(2))}
    ).save_to_disk(tmp_path / "dict")
    Dataset.from_list(_rows(3)).save_to_disk(tmp_path / "single")

    loaded = load_dataset_from_name(str(tmp_path / "dict"))
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (4, 2)
    assert load_dataset_from_name(str(tmp_path / "single"))["train"].num_rows == 3


def test_unreadable_dataset_arguments_fail_clearly(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="must end in"):
        load_dataset_from_name(str(tmp_path / "data.txt"))
    Dataset.from_list(_rows()).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="only applies when `dataset_name` is a local file"):
        load_dataset_from_name(str(tmp_path / "saved"), test_file="x.jsonl")


# ----------------------------------------------------------------------------- file problems


@pytest.mark.parametrize(
    "name", ["data/typo/train.jsonl", "./trian.jsonl", "~/no/such/dir", "a/b/c", "missing.csv"]
)
def test_a_mistyped_local_path_fails_at_once_without_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_dataset_from_name(name)
    assert time.perf_counter() - start < 2.0


def test_a_missing_test_file_is_named(tmp_path):
    Dataset.from_list(_rows()).to_json(tmp_path / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="--dataset_test_file .*tset.jsonl"):
        load_dataset_from_name(
            str(tmp_path / "train.jsonl"), test_file=str(tmp_path / "tset.jsonl")
        )


@pytest.mark.parametrize(("content", "problem"), [(b"", "is empty"), (b"\n \n", "only whitespace")])
def test_an_empty_file_is_named(tmp_path, content, problem):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetFileError, match=f"{path} .*{problem}"):
        load_dataset_from_name(str(path))


def test_an_empty_json_array_has_no_rows(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[]")
    with pytest.raises(DatasetFileError, match=f"{path} holds no rows"):
        load_dataset_from_name(str(path))


def test_a_corrupt_json_lines_row_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DatasetFileError) as error:
        load_dataset_from_name(str(path))
    assert f"{path}, line 3" in str(error.value)
    assert "one JSON object" in str(error.value)


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("a.json", '[\n  {"text": "a"},\n  {"text": }\n]', "line 3, column 12"),
        ("b.jsonl", '{"text": "a"}\n["not", "an", "object"]\n', "line 2: a JSON list"),
        ("c.json", '{"text": "a"}\n{"text": "b",}\n', "line 2"),
    ],
)
def test_find_json_problem(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    assert where in find_json_problem(path)
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert find_json_problem(path) is None


def test_bytes_that_are_not_utf8_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetFileError) as error:
        load_dataset_from_name(str(path))
    assert f"{path}, line 3: not UTF-8" in str(error.value)
    assert "byte 0xe9" in str(error.value)


def test_a_character_split_across_read_chunks_is_valid_utf8(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_READ_CHUNK_BYTES", 5)
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "caf\u00e9 \u2603 \U0001f600"}\n' * 3, encoding="utf-8")
    check_data_file(path)  # every multi-byte character is cut by some chunk boundary
    path.write_bytes(path.read_bytes() + b"\xff\n")
    with pytest.raises(DatasetFileError, match="line 4: not UTF-8"):
        check_data_file(path)


# ----------------------------------------------------------------------------- SFT columns


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": "hello"}],
        [{"prompt": "p", "completion": "c"}],
        [{"messages": [{"role": "user", "content": "hi"}]}],
        [{"input_ids": [1, 2, 3]}],
    ],
)
def test_every_sft_format_passes(rows):
    check_sft_columns(Dataset.from_list(rows))


def test_wrong_columns_name_the_file_the_columns_and_the_formats():
    dataset = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as error:
        check_sft_columns(dataset, name="The 'train' split", source="data/train.jsonl")
    message = str(error.value)
    assert "The 'train' split (data/train.jsonl)" in message
    assert "['answer', 'question']" in message
    assert "`text` or `messages` or `prompt + completion`" in message
    assert SFT_FORMATS in message
    check_sft_columns(dataset, formatting_func=lambda row: row["question"])  # builds the text


def test_half_a_prompt_completion_pair_names_the_other_half():
    with pytest.raises(ValueError, match="missing `completion`"):
        check_sft_columns(Dataset.from_list([{"prompt": "p", "text": "t"}]))
    with pytest.raises(ValueError, match="missing `body`"):
        check_sft_columns(Dataset.from_list([{"title": "t"}]), dataset_text_field="body")


def test_an_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="train_dataset is empty"):
        check_sft_columns(Dataset.from_list([{"text": "x"}]).select([]))


def test_the_trainer_checks_columns_before_preparing(tmp_path):
    with pytest.raises(ValueError, match="missing .*SFTTrainer's dataset formats"):
        build_abkd_trainer(tmp_path, train_dataset=Dataset.from_list([{"q": "a", "a": "b"}] * 4))
    with pytest.raises(ValueError, match=r"eval_dataset\['dev'\] has the columns"):
        build_abkd_trainer(
            tmp_path, eval_dataset={"dev": Dataset.from_list([{"q": "a"}])}, eval_strategy="steps"
        )


# ----------------------------------------------------------------------------- supervision


def test_a_dataset_truncated_to_nothing_supervised_fails_at_construction(tmp_path):
    # Every prompt is longer than 4 byte tokens: truncation leaves no completion token, and
    # SFTTrainer drops every example (training would fail later with "num_samples=0").
    with pytest.raises(ValueError, match="train_dataset has no supervised token.*max_length=4"):
        build_abkd_trainer(tmp_path, train_dataset=build_prompt_completion_dataset(), max_length=4)


def test_a_label_on_the_first_token_only_supervises_nothing():
    # The first label has no position before it to predict it from.
    prepared = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}] * 3)
    with pytest.raises(ValueError, match="no supervised token"):
        check_supervised_tokens(prepared)
    check_supervised_tokens(Dataset.from_list([{"input_ids": [5, 6], "labels": [-100, 6]}]))
    check_supervised_tokens(Dataset.from_list([{"input_ids": [5, 6]}]))  # no labels: not checked
