"""Where a divergence puts its gradient: the mass-allocation picture of ABKD.

The ABKD paper explains forward KL, reverse KL and the alpha-beta divergence by how each one
allocates its gradient over the vocabulary: *hardness-concentration* (weight on tokens where the
student and the teacher disagree, governed by alpha) and *confidence-concentration* (weight on
tokens the student already believes, governed by beta). This module measures that allocation on
real teacher and student distributions.

For one position with student logits `z` (`q = softmax(z)`), teacher distribution `p` and a
separable divergence `D`, the gradient is `g_k = w_k - q_k * sum_j w_j` with `w_k = q_k dD/dq_k`,
the divergence's own gradient weights (`PointwiseDivergence.terms_and_weights`). The *gradient
mass* of vocabulary entry `k` is `|g_k|`. Summed over all supervised positions and grouped by the
teacher's probability `p_k` (or the student's `q_k`) in log-spaced bins, and divided by the total,
it gives the *share* of the gradient each kind of token receives; the shares of one divergence sum
to one. Because `sum_k g_k = 0`, half of the mass raises logits (`g_k < 0`, gradient descent
increases them) and half lowers them; `raise_share` reports the first half per bin (it sums to
0.5).

Positions with larger gradients weigh more: the shares describe the total gradient the optimiser
receives, in the loss's own normalisation.

Example:

```python
from abkd_trainer import plot_mass_allocation
result = plot_mass_allocation(student, teacher, tokenizer, prompts, references,
                              alpha=0.2, beta=0.7, output_dir="allocation")
result["by_teacher_probability"]["AB (0.2, 0.7)"]   # one share per teacher-probability bin
```

`python -m abkd_trainer.tools.mass_allocation --student_model DIR` draws it for the demo teacher
and dataset (see `--help`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abkd_trainer.divergences.chunked import default_chunk_size
from abkd_trainer.divergences.pointwise import (
    LOG_PROB_FLOOR,
    ABDivergence,
    ForwardKL,
    PointwiseDivergence,
    ReverseKL,
)
from abkd_trainer.lm.teacher_forcing import teacher_forcing_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abkd_trainer.lm.teacher_forcing import Prompt

__all__ = [
    "DEFAULT_PROBABILITY_BIN_EDGES",
    "GradientMass",
    "comparison_divergences",
    "gradient_mass_by_probability",
    "mass_allocation",
    "plot_mass_allocation",
]

# Bin edges of a probability: [0, 1e-6), [1e-6, 1e-5), ..., [1e-2, 0.1), [0.1, 0.5), [0.5, 1].
# Decades separate the tail, where reverse-KL-like losses ignore tokens, from the head; the split
# at 0.5 separates a distribution's mode from its runners-up.
DEFAULT_PROBABILITY_BIN_EDGES: tuple[float, ...] = (
    0.0,
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    1e-2,
    1e-1,
    0.5,
    1.0,
)


class GradientMass:
    """Gradient mass per probability bin, accumulated over batches (float64 sums, not shares).

    Attributes:
        by_teacher: `(num_bins,)` sum of `|g_k|` over entries whose teacher probability lies
            in each bin.
        by_student: `(num_bins,)` the same, binned by the student's probability.
        raise_by_teacher: `(num_bins,)` sums of `max(-g_k, 0)`, the part that raises logits,
            binned by the teacher's probability.
        raise_by_student: `(num_bins,)` the same, binned by the student's probability.
        num_positions: positions accumulated so far.
    """

    def __init__(self, num_bins: int) -> None:
        zeros = lambda: torch.zeros(num_bins, dtype=torch.float64)  # noqa: E731
        self.by_teacher, self.by_student = zeros(), zeros()
        self.raise_by_teacher, self.raise_by_student = zeros(), zeros()
        self.num_positions = 0

    def add_(self, other: GradientMass) -> GradientMass:
        for name in ("by_teacher", "by_student", "raise_by_teacher", "raise_by_student"):
            getattr(self, name).add_(getattr(other, name))
        self.num_positions += other.num_positions
        return self

    def shares(self) -> dict[str, list[float]]:
        """Each sum divided by the total gradient mass: `by_*` sum to 1, `raise_by_*` to 0.5."""
        total = float(self.by_teacher.sum())
        if total == 0.0:
            raise ValueError(
                "The gradient is zero at every position (student equals teacher, or no "
                "supervised position): there is no allocation to report."
            )
        return {
            name: (getattr(self, name) / total).tolist()
            for name in ("by_teacher", "by_student", "raise_by_teacher", "raise_by_student")
        }


def _bin_index(probabilities: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    # right=True puts a value equal to an edge into the bin that starts there; clamp keeps p = 1
    # (and p = 0) inside the outer bins.
    return (torch.bucketize(probabilities, edges, right=True) - 1).clamp_(0, edges.numel() - 2)


def gradient_mass_by_probability(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: PointwiseDivergence,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    bin_edges: Sequence[float] = DEFAULT_PROBABILITY_BIN_EDGES,
    chunk_size: int | None = None,
) -> GradientMass:
    """Gradient mass of `divergence` per teacher- and student-probability bin.

    Args:
        student_logits: `(..., V)` student logits, any float dtype (computed in fp32, float64
            for float64 input).
        teacher_logits: `(..., V)` teacher logits over the same vocabulary.
        divergence: a pointwise divergence (e.g. `ABDivergence(0.2, 0.7)`, `ForwardKL()`).
        mask: `(...)` bool, the positions to count (e.g. supervised tokens); None counts all.
        temperature: divides both logit sets before the softmax, as in the training loss.
        bin_edges: increasing probability edges from 0 to 1; `len(bin_edges) - 1` bins.
        chunk_size: positions per chunk (bounds the `(chunk, V)` temporaries); None picks one.

    Returns:
        The sums of `|d D / d z_k|` per bin, see `GradientMass`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape; slice both to the shared "
            "vocabulary first."
        )
    edges_list = [float(edge) for edge in bin_edges]
    if len(edges_list) < 2 or edges_list[0] != 0.0 or edges_list[-1] != 1.0:
        raise ValueError(f"bin_edges must run from 0 to 1, got {edges_list}.")
    if any(low >= high for low, high in zip(edges_list, edges_list[1:], strict=False)):
        raise ValueError(f"bin_edges must be strictly increasing, got {edges_list}.")
    vocab_size = student_logits.shape[-1]
    student_rows = student_logits.detach().reshape(-1, vocab_size)
    teacher_rows = teacher_logits.detach().reshape(-1, vocab_size)
    if mask is not None:
        keep = mask.reshape(-1).to(student_rows.device)
        student_rows, teacher_rows = student_rows[keep], teacher_rows[keep]
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    num_bins = len(edges_list) - 1
    edges = torch.tensor(edges_list, dtype=compute_dtype, device=student_rows.device)
    mass = GradientMass(num_bins)
    chunk_size = chunk_size or default_chunk_size(vocab_size, student_rows.device)
    for start in range(0, student_rows.shape[0], chunk_size):
        student_log_probs = torch.log_softmax(
            student_rows[start : start + chunk_size].to(compute_dtype) / temperature, dim=-1
        )
        teacher_log_probs = torch.log_softmax(
            teacher_rows[start : start + chunk_size].to(compute_dtype) / temperature, dim=-1
        )
        student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
        _, grad_weights = divergence.terms_and_weights(
            student_log_probs.clamp(min=LOG_PROB_FLOOR), teacher_log_probs.clamp(min=LOG_PROB_FLOOR)
        )
        gradient = grad_weights - student_probs * grad_weights.sum(-1, keepdim=True)
        # float64 sums: the shares of both binnings then sum to one to ~1e-15, not fp32's 1e-6.
        magnitude = gradient.abs().double().reshape(-1)
        raising = gradient.neg().clamp_(min=0.0).double().reshape(-1)
        for probabilities, total, raised in (
            (teacher_probs, mass.by_teacher, mass.raise_by_teacher),
            (student_probs, mass.by_student, mass.raise_by_student),
        ):
            index = _bin_index(probabilities, edges).reshape(-1)
            total.add_(torch.bincount(index, magnitude, num_bins).cpu())
            raised.add_(torch.bincount(index, raising, num_bins).cpu())
        mass.num_positions += student_log_probs.shape[0]
    return mass


def comparison_divergences(
    alpha: float | Sequence[float], beta: float | Sequence[float]
) -> dict[str, PointwiseDivergence]:
    """`{"AB (a, b)": ..., "forward KL": ..., "reverse KL": ...}` for one or several settings."""
    alphas = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
    betas = [beta] if isinstance(beta, (int, float)) else list(beta)
    if len(alphas) != len(betas):
        raise ValueError(f"Got {len(alphas)} alphas but {len(betas)} betas; pass one per setting.")
    divergences: dict[str, PointwiseDivergence] = {
        f"AB ({a:g}, {b:g})": ABDivergence(a, b) for a, b in zip(alphas, betas, strict=True)
    }
    divergences["forward KL"] = ForwardKL()
    divergences["reverse KL"] = ReverseKL()
    return divergences


def _response_logits(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' `(positions, vocab)` logits at the positions that predict a response token.

    Rows are prompt + reference; logit columns from `len(tokenizer)` on (padding) are dropped.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention_mask, response_mask = teacher_forcing_batch(
        tokenizer, prompts, references, pad_id
    )
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    vocab_size = len(tokenizer)
    student_logits = student(**inputs).logits[..., :vocab_size][response_mask]
    teacher_logits = teacher(**inputs).logits.to(device)[..., :vocab_size][response_mask]
    return student_logits, teacher_logits


def _add_own_mass(
    own_mass: torch.Tensor, logits: torch.Tensor, edges: torch.Tensor, temperature: float
) -> None:
    """Add each bin's share of a model's own probability (`(num_bins,)` float64) in place."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    index = _bin_index(probs, edges).reshape(-1)
    own_mass.add_(torch.bincount(index, probs.reshape(-1), len(own_mass)).double())


def _allocation_result(
    totals: Mapping[str, GradientMass],
    own_mass: Mapping[str, torch.Tensor],
    bin_edges: Sequence[float],
    temperature: float,
) -> dict[str, Any]:
    """The JSON-ready result of `mass_allocation` from its accumulated sums."""
    shares = {name: mass.shares() for name, mass in totals.items()}
    num_positions = next(iter(totals.values())).num_positions
    return {
        "bin_edges": [float(edge) for edge in bin_edges],
        "num_positions": num_positions,
        "temperature": temperature,
        "by_teacher_probability": {name: s["by_teacher"] for name, s in shares.items()},
        "by_student_probability": {name: s["by_student"] for name, s in shares.items()},
        "raise_by_teacher_probability": {name: s["raise_by_teacher"] for name, s in shares.items()},
        "raise_by_student_probability": {name: s["raise_by_student"] for name, s in shares.items()},
        "teacher_probability_mass": (own_mass["teacher"] / num_positions).tolist(),
        "student_probability_mass": (own_mass["student"] / num_positions).tolist(),
    }


@torch.no_grad()
def mass_allocation(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    divergences: Mapping[str, PointwiseDivergence],
    *,
    temperature: float = 1.0,
    bin_edges: Sequence[float] = DEFAULT_PROBABILITY_BIN_EDGES,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Gradient shares of each divergence on a model pair, under teacher forcing.

    Both models read prompt + reference response; every position that predicts a response token
    (EOS included) counts, over the tokenizer's vocabulary (padded logit rows are dropped).

    Args:
        student: the student causal LM; its gradient is the one measured.
        teacher: the teacher, over the same vocabulary (its logits are moved to the student's
            device).
        tokenizer: the tokenizer both models read.
        prompts: plain-text prompts or chat messages.
        references: one reference response per prompt.
        divergences: name -> pointwise divergence, e.g. from `comparison_divergences`.
        temperature: divides both logit sets before the softmax, as in the training loss.
        bin_edges: increasing probability edges from 0 to 1; `len(bin_edges) - 1` bins.
        batch_size: rows per forward pass.

    Returns:
        A JSON-ready dict: `bin_edges`, `num_positions`, and for each of
        `by_teacher_probability`, `by_student_probability`, `raise_by_teacher_probability`,
        `raise_by_student_probability` a `name -> shares per bin` mapping; plus
        `teacher_probability_mass` / `student_probability_mass`, the share of each model's
        own probability mass in each bin of its probability (how much there is to allocate).
    """
    if len(prompts) != len(references):
        raise ValueError(f"Got {len(prompts)} prompts but {len(references)} references.")
    if not prompts:
        raise ValueError("mass_allocation needs at least one prompt.")
    device = next(student.parameters()).device
    num_bins = len(bin_edges) - 1
    totals = {name: GradientMass(num_bins) for name in divergences}
    own_mass = {"teacher": torch.zeros(num_bins, dtype=torch.float64)}
    own_mass["student"] = own_mass["teacher"].clone()
    edges = torch.tensor(list(bin_edges), dtype=torch.float32)
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            student_logits, teacher_logits = _response_logits(
                student,
                teacher,
                tokenizer,
                prompts[start : start + batch_size],
                references[start : start + batch_size],
                device,
            )
            for name, divergence in divergences.items():
                totals[name].add_(
                    gradient_mass_by_probability(
                        student_logits,
                        teacher_logits,
                        divergence,
                        temperature=temperature,
                        bin_edges=bin_edges,
                    )
                )
            _add_own_mass(own_mass["teacher"], teacher_logits, edges, temperature)
            _add_own_mass(own_mass["student"], student_logits, edges, temperature)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    return _allocation_result(totals, own_mass, bin_edges, temperature)


def _bin_labels(edges: Sequence[float]) -> list[str]:
    def fmt(value: float) -> str:
        if value == 0.0:
            return "0"
        exponent = math.log10(value)
        return f"1e{int(exponent)}" if exponent == int(exponent) and value < 0.1 else f"{value:g}"

    return [f"[{fmt(low)}, {fmt(high)})" for low, high in zip(edges, edges[1:], strict=False)]


def draw_mass_allocation(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Draw `result` (from `mass_allocation`) as two grouped bar charts into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _bin_labels(result["bin_edges"])
    panels = (
        ("by_teacher_probability", "teacher_probability_mass", "teacher probability p_k"),
        ("by_student_probability", "student_probability_mass", "student probability q_k"),
    )
    names = list(result["by_teacher_probability"])
    positions = torch.arange(len(labels)).tolist()
    width = 0.8 / len(names)
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for axis, (key, own_key, xlabel) in zip(axes, panels, strict=True):
        for index, name in enumerate(names):
            offsets = [x - 0.4 + width * (index + 0.5) for x in positions]
            axis.bar(offsets, result[key][name], width=width, label=name)
        axis.plot(
            positions,
            result[own_key],
            color="black",
            marker="o",
            linestyle=":",
            label=f"{xlabel.split()[0]}'s own probability mass",
        )
        axis.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        axis.set_xlabel(f"vocabulary entries binned by {xlabel}")
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of the gradient mass |dD/dz_k|")
    axes[0].legend(fontsize=8)
    figure.suptitle(title or f"Where the gradient goes ({result['num_positions']} positions)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_mass_allocation(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    *,
    alpha: float | Sequence[float],
    beta: float | Sequence[float],
    output_dir: str | Path,
    temperature: float = 1.0,
    bin_edges: Sequence[float] = DEFAULT_PROBABILITY_BIN_EDGES,
    batch_size: int = 32,
    title: str = "",
) -> dict[str, Any]:
    """Measure the allocation of AB(alpha, beta), forward and reverse KL; write PNG and JSON.

    `alpha` / `beta` may be sequences to compare several settings. Writes
    `mass_allocation.png` and `mass_allocation.json` into `output_dir`.

    Args:
        student: the student causal LM.
        teacher: the teacher, over the same vocabulary.
        tokenizer: the tokenizer both models read.
        prompts: plain-text prompts or chat messages.
        references: one reference response per prompt.
        alpha: alpha of the AB divergence, or one per setting.
        beta: beta of the AB divergence, or one per setting (as many as `alpha`).
        output_dir: where the PNG and the JSON are written (created if missing).
        temperature: divides both logit sets before the softmax, as in the training loss.
        bin_edges: increasing probability edges from 0 to 1; `len(bin_edges) - 1` bins.
        batch_size: rows per forward pass.
        title: the chart's title; empty: "Where the gradient goes (N positions)".

    Returns:
        The [`mass_allocation`][abkd_trainer.tools.mass_allocation.mass_allocation] result, with
        the written paths under `"files"`.
    """
    result = mass_allocation(
        student,
        teacher,
        tokenizer,
        prompts,
        references,
        comparison_divergences(alpha, beta),
        temperature=temperature,
        bin_edges=bin_edges,
        batch_size=batch_size,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "mass_allocation.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = draw_mass_allocation(result, output_dir / "mass_allocation.png", title)
    return {**result, "files": [str(png_path), str(json_path)]}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from abkd_trainer.lm.demo import DEMO_TEACHER_DIR

    parser = argparse.ArgumentParser(
        prog="python -m abkd_trainer.tools.mass_allocation",
        description="Draw where AB(alpha, beta), forward KL and reverse KL put their gradient "
        "on a real teacher/student pair (default: the demo teacher and dataset).",
    )
    parser.add_argument("--student_model", required=True, help="Student: a path or Hub id.")
    parser.add_argument("--teacher_model", default=str(DEMO_TEACHER_DIR), help="Teacher.")
    parser.add_argument(
        "--dataset_file",
        default=None,
        help="A prompt/completion .json/.jsonl file (default: the demo's test split).",
    )
    parser.add_argument("--num_prompts", type=int, default=64, help="Rows to use.")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.2])
    parser.add_argument("--beta", type=float, nargs="+", default=[0.7])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--output_dir", default="mass-allocation")
    parser.add_argument("--title", default="")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m abkd_trainer.tools.mass_allocation`: PNG and JSON for a model pair."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abkd_trainer.lm.demo import DEMO_ASSETS_DIR, DEMO_DATA_FILES
    from abkd_trainer.lm.evaluation import prompts_and_references

    args = _parse_args(argv)
    data_file = args.dataset_file or str(DEMO_ASSETS_DIR / DEMO_DATA_FILES["test"])
    rows = load_dataset("json", data_files={"test": data_file})["test"]
    rows = rows.select(range(min(args.num_prompts, len(rows))))
    prompts, references = prompts_and_references(rows)
    references = [ref if isinstance(ref, str) else ref[0] for ref in references]
    tokenizer = AutoTokenizer.from_pretrained(args.student_model)
    student = AutoModelForCausalLM.from_pretrained(args.student_model)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model)
    result = plot_mass_allocation(
        student,
        teacher,
        tokenizer,
        prompts,
        references,
        alpha=args.alpha,
        beta=args.beta,
        output_dir=args.output_dir,
        temperature=args.temperature,
        title=args.title,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    print("Wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
