"""The model card and what push_to_hub would upload (stopped at the HTTP boundary)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers.trainer
from huggingface_hub import ModelCard
from safetensors import safe_open
from testing_utils import (
    build_abkd_trainer,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
    hub_no_network,
    hub_whoami,
)

from abkd_trainer.core.hub import HubAccessError
from abkd_trainer.lm.evaluation import RougeLCallback, prompts_and_references

REQUIRED_TAGS = {"abkd", "knowledge-distillation", "trl"}


def distilled_trainer(tmp_path, **overrides):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher.config._name_or_path = "acme/teacher-7b"  # as if loaded from the Hub
    return build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        alpha=0.3,
        beta=0.6,
        **overrides,
    )


def assert_abkd_card(card_path: Path, *, alpha: str, beta: str) -> None:
    card = ModelCard.load(card_path)
    assert REQUIRED_TAGS <= set(card.data.tags)
    text = card.text
    assert "2505.04560" in text  # paper link and BibTeX citation
    assert "@inproceedings{wang2025abkd" in text
    assert "| Teacher | acme/teacher-7b |" in text
    assert "| Divergence | ab |" in text
    assert f"| alpha | {alpha} |" in text
    assert f"| beta | {beta} |" in text
    assert text.count("## Distillation") == 1


def test_model_card_written_on_save(tmp_path):
    trainer = distilled_trainer(tmp_path / "run")
    trainer.train()
    trainer.save_model()
    assert_abkd_card(tmp_path / "run" / "README.md", alpha="0.3", beta="0.6")
    # Saving again (as at every checkpoint) keeps one section.
    trainer.save_model(str(tmp_path / "elsewhere"))
    assert_abkd_card(tmp_path / "elsewhere" / "README.md", alpha="0.3", beta="0.6")


def test_model_card_records_the_schedule(tmp_path):
    trainer = distilled_trainer(tmp_path, alpha_end=0.9)
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert "| alpha_end | 0.9 |" in text
    assert "beta_end" not in text


class RecordingHubApi:
    """Stands in for huggingface_hub.HfApi: records what would be sent, sends nothing."""

    def __init__(self) -> None:
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        files = {
            str(path.relative_to(folder_path)): path.read_bytes()
            for path in Path(folder_path).rglob("*")
            if path.is_file()
        }
        self.uploads.append({"repo_id": repo_id, "files": files, "ignore": list(ignore_patterns)})
        return SimpleNamespace(commit_url="https://example.invalid/commit")


def test_push_to_hub_uploads_the_student_only(tmp_path, monkeypatch):
    api = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer = distilled_trainer(tmp_path / "run", hub_model_id="acme/abkd-student")
    trainer.train()
    trainer.push_to_hub()

    (upload,) = api.uploads
    assert upload["repo_id"] == "acme/abkd-student"
    files = upload["files"]
    assert "model.safetensors" in files and "config.json" in files
    # training_args.bin is Trainer's pickled arguments; weights travel as safetensors only.
    weight_files = [name for name in files if name.endswith((".safetensors", ".pt", ".pth"))]
    weight_files += [name for name in files if name.startswith("pytorch_model")]
    assert weight_files == ["model.safetensors"]
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    student = {name: tuple(t.shape) for name, t in trainer.model.state_dict().items()}
    assert stored.items() <= student.items()
    teacher_bytes = sum(p.numel() * p.element_size() for p in trainer.teacher_model.parameters())
    assert len(files["model.safetensors"]) < teacher_bytes
    assert_abkd_card(tmp_path / "run" / "README.md", alpha="0.3", beta="0.6")
    assert "README.md" in files


def test_model_card_of_a_student_without_hub_id_names_no_fake_base_model(tmp_path):
    # Built from a config, the student has no Hub id: TRL's template would link a model "None".
    trainer = distilled_trainer(tmp_path)
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert "huggingface.co/None" not in text
    assert "student distilled with ABKD" in text
    # The quick-start snippet loads the saved student, not a model called "None".
    assert 'model="None"' not in text
    assert f'model="{tmp_path}"' in text


def test_model_card_of_a_hub_student_keeps_its_base_model(tmp_path):
    trainer = distilled_trainer(tmp_path)
    trainer.model.config._name_or_path = "acme/student-0.5b"
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert (
        "fine-tuned version of [acme/student-0.5b](https://huggingface.co/acme/student-0.5b)"
        in text
    )


def test_model_card_names_a_local_teacher_by_its_folder_not_its_path(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher_dir = tmp_path / "models" / "my-teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    trainer = build_abkd_trainer(
        tmp_path / "run", tokenizer=tokenizer, student=student, teacher=str(teacher_dir)
    )
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "run" / "README.md").text
    assert "| Teacher | my-teacher |" in text
    assert str(teacher_dir) not in text


def test_model_card_of_a_teacher_from_the_hub_cache_names_its_hub_id(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher.config._name_or_path = "/cache/hub/models--acme--teacher-7b/snapshots/0123abc"
    trainer = build_abkd_trainer(tmp_path, tokenizer=tokenizer, student=student, teacher=teacher)
    trainer.create_model_card()
    assert "| Teacher | acme/teacher-7b |" in ModelCard.load(tmp_path / "README.md").text


def test_model_card_carries_the_rouge_l_evaluation_as_model_index(tmp_path, monkeypatch):
    trainer = distilled_trainer(tmp_path / "run", hub_model_id="acme/abkd-student")
    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    rouge = RougeLCallback(
        trainer,
        prompts,
        references,
        seeds=(0, 1),
        max_new_tokens=3,
        evaluate_at_train_boundaries=True,
        dataset_name="/data/dolly/test.jsonl",
        dataset_split="test",
    )
    trainer.add_callback(rouge)
    trainer.train()
    trainer.save_model()

    def eval_result(card_path):
        card = ModelCard.load(card_path)
        (result,) = card.data.eval_results
        return card, result

    card, result = eval_result(tmp_path / "run" / "README.md")
    assert card.data.model_name == "run"
    assert result.metric_name == "ROUGE-L" and result.metric_type == "rouge"
    assert result.metric_value == pytest.approx(rouge.results["student_after"].rouge_l, abs=1e-4)
    assert (result.dataset_name, result.dataset_type, result.dataset_split) == (
        "test.jsonl",
        "local",
        "test",
    )
    assert result.metric_args["seeds"] == [0, 1]
    assert_abkd_card(tmp_path / "run" / "README.md", alpha="0.3", beta="0.6")

    # push_to_hub writes the card again: the evaluation stays in what is uploaded.
    api = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer.push_to_hub()
    (upload,) = api.uploads
    uploaded = tmp_path / "uploaded.md"
    uploaded.write_bytes(upload["files"]["README.md"])
    assert eval_result(uploaded)[1].metric_value == result.metric_value


def test_model_card_without_an_evaluation_has_no_model_index(tmp_path):
    trainer = distilled_trainer(tmp_path)
    trainer.create_model_card()
    assert not ModelCard.load(tmp_path / "README.md").data.eval_results


def test_push_to_hub_without_network_fails_at_construction_naming_the_hub(tmp_path, hub_http):
    hub_http(hub_no_network)
    with pytest.raises(HubAccessError, match=r"--push_to_hub: cannot reach the Hugging Face Hub"):
        distilled_trainer(tmp_path / "run", push_to_hub=True, hub_model_id="acme/student")
    assert not (tmp_path / "run").exists()  # nothing trained or written


def test_push_to_hub_with_a_writable_token_constructs(tmp_path, hub_http):
    hub_http(hub_whoami("write", create_repo=True))
    trainer = distilled_trainer(tmp_path / "run", push_to_hub=True, hub_model_id="acme/student")
    assert trainer.hub_model_id == "acme/student"
