"""The distilled classifier's model card and what push_to_hub would upload (no network)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers.trainer
from classifier_factories import build_image_dataset, build_image_trainer, build_vit_classifier
from huggingface_hub import ModelCard
from testing_utils import hub_no_network, hub_whoami

from abkd_trainer.core.hub import HubAccessError


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
        self.uploads.append({"repo_id": repo_id, "files": files})
        return SimpleNamespace(commit_url="https://example.invalid/commit")


def evaluated_trainer(tmp_path, **overrides):
    teacher = build_vit_classifier()
    teacher.config._name_or_path = "acme/vit-digits"  # as if loaded from the Hub
    trainer = build_image_trainer(
        tmp_path, teacher=teacher, eval_dataset=build_image_dataset(8, seed=1), **overrides
    )
    trainer.train()
    trainer.evaluate()
    return trainer


def test_model_card_names_the_teacher_the_settings_and_the_evaluation(tmp_path):
    trainer = evaluated_trainer(
        tmp_path / "run", divergence="ab", alpha=0.6, beta=0.4, temperature=4.0, kd_weight=1.0
    )
    trainer.save_model()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert {"abkd", "knowledge-distillation"} <= set(card.data.tags)
    text = card.text
    assert "| Teacher | acme/vit-digits |" in text
    assert "| Divergence | ab |" in text
    assert "| alpha | 0.6 |" in text and "| beta | 0.4 |" in text
    assert "| temperature | 4 |" in text and "| kd_weight | 1 |" in text
    assert text.count("## Distillation") == 1
    # The student was built from a config: no empty link to a base model, no "None" dataset.
    assert "huggingface.co/)" not in text and "None dataset" not in text
    assert "This model is a student distilled with ABKD." in text
    (result,) = card.data.eval_results
    evaluation = [log for log in trainer.state.log_history if "eval_accuracy" in log][-1]
    assert result.task_type == "image-classification"
    assert result.metric_type == "accuracy"
    assert result.metric_value == pytest.approx(evaluation["eval_accuracy"], abs=1e-4)
    assert result.metric_args["teacher_accuracy"] == pytest.approx(
        evaluation["eval_teacher_accuracy"], abs=1e-4
    )


def test_model_card_records_a_reordered_teacher(tmp_path):
    teacher = build_vit_classifier(class_names=("one", "zero", "two", "three"))
    trainer = build_image_trainer(
        tmp_path,
        teacher=teacher,
        student=build_vit_classifier(hidden_size=16, num_layers=1, seed=3),
    )
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "README.md").text
    assert "teacher column of each class: [1, 0, 2, 3]" in text


def test_push_to_hub_uploads_the_student_and_its_card(tmp_path, monkeypatch):
    api = RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer = evaluated_trainer(tmp_path / "run", hub_model_id="acme/resnet-distilled")
    trainer.push_to_hub()
    (upload,) = api.uploads
    assert upload["repo_id"] == "acme/resnet-distilled"
    files = upload["files"]
    assert "model.safetensors" in files and "config.json" in files
    assert [name for name in files if name.endswith(".safetensors")] == ["model.safetensors"]
    teacher_bytes = sum(p.numel() * p.element_size() for p in trainer.teacher_model.parameters())
    assert len(files["model.safetensors"]) < teacher_bytes  # the student, not the teacher
    uploaded = tmp_path / "uploaded.md"
    uploaded.write_bytes(files["README.md"])
    card = ModelCard.load(uploaded)
    assert "| Teacher | acme/vit-digits |" in card.text
    assert card.data.eval_results[0].metric_type == "accuracy"


def test_push_to_hub_without_network_fails_at_construction_naming_the_hub(tmp_path, hub_http):
    hub_http(hub_no_network)
    with pytest.raises(HubAccessError, match=r"--push_to_hub: cannot reach the Hugging Face Hub"):
        build_image_trainer(tmp_path / "run", push_to_hub=True, hub_model_id="acme/student")
    assert not (tmp_path / "run").exists()


def test_push_to_hub_with_a_writable_token_constructs(tmp_path, hub_http):
    hub_http(hub_whoami("write", create_repo=True))
    trainer = build_image_trainer(tmp_path / "run", push_to_hub=True, hub_model_id="acme/student")
    assert trainer.hub_model_id == "acme/student"
