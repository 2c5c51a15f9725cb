"""The parts every run report shares: environment, terminal and Markdown tables."""

from __future__ import annotations

from abkd_trainer.core.reports import (
    environment_info,
    markdown_table,
    plain_text_table,
    settings_sections,
)


def test_plain_text_table_aligns_the_first_column_left_and_the_others_right():
    text = plain_text_table("Title", ["model", "score"], [["teacher", "9.5"], ["s", "10.25"]])
    title, rule, header, rule2, first, second, rule3 = text.split("\n")
    assert title == "Title" and rule == rule2 == rule3 == "-" * len(header)
    assert header == "model    score"
    assert first == "teacher    9.5" and second == "s        10.25"


def test_markdown_table_has_one_separator_cell_per_column():
    assert markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]


def test_settings_sections_leave_out_unset_values_and_round_floats():
    lines = settings_sections(
        {"training": {"alpha": 0.123456, "beta": None, "steps": 3}, "environment": {"torch": "2"}}
    )
    assert "| alpha | 0.1235 |" in lines and "| steps | 3 |" in lines
    assert not any("beta" in line for line in lines)
    assert lines[lines.index("## Environment") + 4] == "| torch | 2 |"
    assert "## Environment" not in settings_sections({"training": {}})


def test_environment_names_the_cpu_and_the_process_count():
    info = environment_info("cpu", num_processes=2)
    assert info["device"].startswith("cpu (") and info["num_processes"] == 2
