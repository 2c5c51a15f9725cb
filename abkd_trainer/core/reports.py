"""What every run report shares: the environment behind a number and the table layouts.

`abkd-train`'s report (`abkd_trainer.tools.report`) and `abkd-train-classifier`'s
(`abkd_trainer.classification.report`) score different things (ROUGE-L and divergences, top-1
accuracy) but record the machine the same way and lay their tables out alike: an aligned
plain-text table for the terminal and Markdown tables with the run's settings and environment for
`report.md`.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "cpu_model",
    "environment_info",
    "markdown_table",
    "plain_text_table",
    "settings_sections",
]


def environment_info(device: Any = None, *, num_processes: int = 1) -> dict[str, Any]:
    """The software and hardware behind a result, so that a number can be traced and rerun.

    Args:
        device: the training device (`torch.device` or its name); None means CPU.
        num_processes: processes (ranks) of the run.

    Returns:
        `abkd_trainer`, `torch`, `transformers`, `trl`, `datasets` and `python`
        versions, `torch_num_threads` (intra-op threads of this process, which change the
        floating-point summation order on CPU), `device` (with the GPU or CPU model),
        `num_processes`, `cpu_count` and `platform`.
    """
    import datasets
    import torch
    import transformers
    import trl

    from abkd_trainer import __version__

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = f"{device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        device_name = f"cpu ({cpu_model()})"
    else:
        device_name = str(device)
    return {
        "abkd_trainer": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "device": device_name,
        "num_processes": num_processes,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plain_text_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned table for the terminal: the title, rules, the header and the rows.

    Args:
        title: the line above the table.
        header: the column names.
        rows: the cells, one sequence per row, as long as `header`; the first column is
            left-aligned, the others right-aligned.
    """
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(row) for row in rows), rule])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table.

    Args:
        header: the column names.
        rows: the cells, one sequence per row.
    """
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def settings_sections(report: Mapping[str, Any]) -> list[str]:
    """The `## Training` and `## Environment` sections of a `report.md`, as lines.

    Args:
        report: a report with a `training` mapping (settings; None values are left out, floats
            shown to 4 significant digits) and, optionally, an `environment` mapping.
    """
    lines = ["## Training", "", "| setting | value |", "| --- | --- |"]
    for key, value in report.get("training", {}).items():
        if value is not None:
            lines.append(f"| {key} | {f'{value:.4g}' if isinstance(value, float) else value} |")
    lines.append("")
    environment = report.get("environment", {})
    if environment:
        lines += ["## Environment", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in environment.items()]
        lines.append("")
    return lines
