"""The demo task breakdown: every test prompt has a task, and the per-task scores add up."""

from __future__ import annotations

from collections import Counter

from testing_utils import load_script

breakdown_script = load_script("benchmarks/demo_task_breakdown.py", "demo_task_breakdown")


def test_every_demo_test_prompt_gets_its_task():
    from abkd_trainer.lm.demo import load_demo_dataset

    prompts = load_demo_dataset()["test"]["prompt"]
    tasks = Counter(breakdown_script.task_of(prompt) for prompt in prompts)
    # 50 questions: "what color" (19), "what does" (18), "where does" (13).
    assert tasks == {"describe": 40, "question": 50, "name": 18, "repeat": 47, "reverse": 45}
    assert breakdown_script.task_of("question : reverse : fox owl answer :") == "reverse"
    assert breakdown_script.task_of("question : where does the yak live ? answer :") == "question"


def test_the_overall_score_is_the_prompt_weighted_mean_of_the_tasks():
    from abkd_trainer.lm.demo import DEMO_TEACHER_DIR

    result = breakdown_script.breakdown(str(DEMO_TEACHER_DIR), seeds=[0], max_new_tokens=24)
    counts = {"describe": 40, "question": 50, "name": 18, "repeat": 47, "reverse": 45}
    weighted = sum(result[task] * n for task, n in counts.items()) / sum(counts.values())
    assert abs(result["all"] - weighted) < 1e-9
    # The teacher copies and reverses word lists (nearly) perfectly; describing is the open task.
    assert result["repeat"] > 95 and result["reverse"] > 95
    assert result["describe"] < result["repeat"]
    assert result["all"] > 70
