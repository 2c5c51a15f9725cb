"""What the loss reads from a collated batch: next-token targets and the input-token count."""

from __future__ import annotations

import pytest
import torch

from abkd_trainer.lm.batches import IGNORE_INDEX, input_token_count, next_token_targets


def test_next_token_targets_shift_labels_left_and_end_unsupervised():
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    targets = next_token_targets({"labels": labels})
    assert targets.tolist() == [[5, 6, 7, IGNORE_INDEX], [-100, 8, -100, IGNORE_INDEX]]
    assert targets.shape == labels.shape


def test_next_token_targets_use_a_collators_shift_labels_as_they_are():
    shift_labels = torch.tensor([[3, 4, -100]])
    labels = torch.tensor([[9, 9, 9]])
    assert next_token_targets({"labels": labels, "shift_labels": shift_labels}) is shift_labels


def test_next_token_targets_without_labels_name_the_batch_keys():
    with pytest.raises(ValueError, match=r"needs `labels`.*\['attention_mask', 'input_ids'\]"):
        next_token_targets({"input_ids": torch.zeros(1, 3), "attention_mask": torch.ones(1, 3)})


def test_input_token_count_excludes_padding_and_reads_packed_batches():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert input_token_count({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == 5
    packed = {"input_ids": torch.zeros(1, 7), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]])}
    assert input_token_count(packed) == 7
    assert input_token_count({"input_ids": torch.zeros(2, 3)}) == 6
