"""Bit-for-bit check of the fused divergence kernels across a refactor.

Runs the fused and coarsened kernels (`fused_linear_divergence`, `fused_linear_ab_divergence`,
`coarsened_divergence`, `fused_linear_coarsened_divergence`) on fixed cases modelled on
`tests/divergences/test_fused_linear.py` and `test_coarsened.py` (every registry divergence,
reductions, masks, temperatures, logit transforms, padded heads, tile sizes, labels with both loss
weights, 16-bit parameters, autocast, no-grad mode) and saves every value and every student
gradient. Two saved runs, e.g. of the tree before and after a change, are then compared with
`torch.equal` (same dtype, shape and bits):

    PYTHONPATH=/path/to/old/tree python benchmarks/check_kernel_equality.py save before.pt
    python benchmarks/check_kernel_equality.py save after.pt
    python benchmarks/check_kernel_equality.py compare before.pt after.pt

Only the kernels' public import paths are used, so any tree that has them can be saved. Runs on
one CPU thread (about 2 s on a 2-core machine).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

import abkd_trainer.divergences as divergences_package
from abkd_trainer.divergences.coarsened import (
    CachedTeacher,
    coarsened_divergence,
    fused_linear_coarsened_divergence,
)
from abkd_trainer.divergences.fused_linear import (
    fused_linear_ab_divergence,
    fused_linear_divergence,
)

# (name, parameters): the divergence cases of tests/divergences/divergence_cases.py.
DIVERGENCE_CASES = [
    ("ab", {"alpha": 0.2, "beta": 0.7}),
    ("ab", {"alpha": 1.0, "beta": 0.0}),
    ("ab", {"alpha": 0.0, "beta": 1.0}),
    ("ab", {"alpha": 0.0, "beta": 0.0}),
    ("ab", {"alpha": 0.5, "beta": -0.5}),
    ("ab", {"alpha": -0.3, "beta": 0.9}),
    ("fkl", {}),
    ("rkl", {}),
    *(("jsd", {"beta": beta}) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)),
    *(("sfkl", {"skew_lambda": value}) for value in (0.0, 0.1, 0.5, 1.0)),
    *(("srkl", {"skew_lambda": value}) for value in (0.0, 0.1, 0.5, 1.0)),
    ("tvd", {}),
]
ONE_PER_NAME = [
    ("ab", {"alpha": 0.2, "beta": 0.7}),
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.5}),
    ("sfkl", {"skew_lambda": 0.1}),
    ("srkl", {"skew_lambda": 0.1}),
    ("tvd", {}),
]
# The per-row output fields of the fused kernels when given labels.
OUTPUT_FIELDS = (
    "loss",
    "divergence",
    "cross_entropy",
    "teacher_agreement",
    "num_tokens",
    "student_entropy",
    "teacher_entropy",
    "token_accuracy",
)

Results = dict[str, torch.Tensor]


def case_id(name: str, params: dict[str, float]) -> str:
    return name + "(" + ",".join(f"{key}={value:g}" for key, value in params.items()) + ")"


def randn(generator: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.float64):
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def make_heads(
    positions: tuple[int, ...] = (13,),
    vocab: int = 29,
    *,
    student_rows: int | None = None,
    teacher_rows: int | None = None,
    hidden_student: int = 8,
    hidden_teacher: int = 12,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Student and teacher hidden states and heads (as in test_fused_linear.make_heads)."""
    generator = torch.Generator().manual_seed(seed)
    student_rows, teacher_rows = student_rows or vocab, teacher_rows or vocab
    return {
        "student_hidden": randn(generator, *positions, hidden_student, dtype=dtype),
        "student_weight": randn(
            generator,
            student_rows,
            hidden_student,
            scale=2 / math.sqrt(hidden_student),
            dtype=dtype,
        ),
        "student_bias": randn(generator, student_rows, scale=0.5, dtype=dtype) if bias else None,
        "teacher_hidden": randn(generator, *positions, hidden_teacher, dtype=dtype),
        "teacher_weight": randn(
            generator,
            teacher_rows,
            hidden_teacher,
            scale=3 / math.sqrt(hidden_teacher),
            dtype=dtype,
        ),
        "teacher_bias": randn(generator, teacher_rows, scale=0.5, dtype=dtype) if bias else None,
    }


STUDENT_LEAVES = ("student_hidden", "student_weight", "student_bias")


def fresh_leaves(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {
        name: None
        if value is None
        else value.detach().clone().requires_grad_(name in STUDENT_LEAVES)
        for name, value in tensors.items()
    }


def upstream(values: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Distinct upstream gradients per position, so that per-row outputs are checked per row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(values.shape, generator=generator, dtype=torch.float64).to(values.dtype) + 0.5


def record(
    results: Results,
    key: str,
    run: Callable[[dict], torch.Tensor | tuple],
    tensors: dict[str, torch.Tensor | None],
    *,
    grad: bool = True,
) -> None:
    """Run `run` on fresh leaves and store its outputs and the student's gradients."""
    leaves = fresh_leaves(tensors)
    with nullcontext() if grad else torch.no_grad():
        output = run(leaves)
    fields = (
        dict(zip(OUTPUT_FIELDS, output, strict=True))
        if isinstance(output, tuple)
        else {"loss": output}
    )
    for name, value in fields.items():
        results[f"{key}/{name}"] = value.detach().clone()
    loss = fields["loss"]
    if not grad or not loss.requires_grad:
        return
    (loss * upstream(loss)).sum().backward()
    for name in STUDENT_LEAVES:
        leaf = leaves.get(name)
        if leaf is not None:
            results[f"{key}/grad_{name}"] = leaf.grad.clone()


@contextmanager
def pointwise_rows(rows_times_vocab: int) -> Iterator[None]:
    """Set the divergence tile size of whichever loaded kernel module defines it."""
    name = "CPU_POINTWISE_ELEMENTS_PER_THREAD"
    modules = [
        module
        for module_name, module in sys.modules.items()
        if module_name.startswith(divergences_package.__name__) and hasattr(module, name)
    ]
    saved = [getattr(module, name) for module in modules]
    for module in modules:
        setattr(module, name, rows_times_vocab)
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            setattr(module, name, value)


def live(leaves: dict, *args, **kwargs):
    """`fused_linear_divergence` on a heads dict."""
    return fused_linear_divergence(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves["teacher_hidden"],
        leaves["teacher_weight"],
        *args,
        student_bias=leaves["student_bias"],
        teacher_bias=leaves["teacher_bias"],
        **kwargs,
    )


def live_ab(leaves: dict, alpha: float, beta: float, **kwargs):
    return fused_linear_ab_divergence(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves["teacher_hidden"],
        leaves["teacher_weight"],
        alpha,
        beta,
        student_bias=leaves["student_bias"],
        teacher_bias=leaves["teacher_bias"],
        **kwargs,
    )


def live_cases(results: Results) -> None:
    """The live-teacher kernel on the cases of test_fused_linear.py (and autocast)."""
    heads = make_heads(positions=(2, 7), seed=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = mask[1, 5] = False
    for name, params in DIVERGENCE_CASES:
        for reduction in ("none", "sum", "mean"):
            record(
                results,
                f"live/every/{case_id(name, params)}/{reduction}",
                lambda h, n=name, p=params, r=reduction: live(
                    h, n, divergence_params=p, mask=mask, reduction=r, chunk_size=3
                ),
                heads,
            )
    heads = make_heads(positions=(24,), vocab=37, dtype=torch.float32, seed=2)
    ab_cases = [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (-0.3, 0.9)]
    for alpha, beta in [*ab_cases, (0.8, 0.3)]:
        for temperature in (1.0, 0.5, 2.0):
            record(
                results,
                f"live/ab_fp32/{alpha},{beta}/T={temperature}",
                lambda h, a=alpha, b=beta, t=temperature: live_ab(
                    h, a, b, temperature=t, reduction="none", chunk_size=5
                ),
                heads,
            )
    transforms = {
        "softcap": {"student_logit_softcap": 3.0, "teacher_logit_softcap": 4.0},
        "scale": {"student_logit_scale": 0.5, "teacher_logit_scale": 2.0},
        "scale+softcap": {
            "student_logit_scale": 1.5,
            "student_logit_softcap": 2.0,
            "teacher_logit_scale": 0.7,
            "teacher_logit_softcap": 30.0,
        },
    }
    heads = make_heads(seed=3)
    for transform_id, transform in transforms.items():
        for name, params in ONE_PER_NAME:
            record(
                results,
                f"live/transform/{transform_id}/{case_id(name, params)}",
                lambda h, n=name, p=params, x=transform: live(
                    h, n, divergence_params=p, temperature=1.5, reduction="none", chunk_size=4, **x
                ),
                heads,
            )
    for student_rows, teacher_rows in ((29, 32), (35, 29), (33, 40)):
        record(
            results,
            f"live/padded/{student_rows},{teacher_rows}",
            lambda h: live_ab(h, 0.2, 0.7, vocab_size=29, reduction="none"),
            make_heads(vocab=29, student_rows=student_rows, teacher_rows=teacher_rows, seed=4),
        )
    live_label_cases(results)
    live_precision_cases(results)


def live_label_cases(results: Results) -> None:
    """Labels: tiling, both loss weights, entropies, an all-masked batch."""
    heads = make_heads(vocab=29, seed=5)
    labels = torch.randint(0, 29, (13,), generator=torch.Generator().manual_seed(5))
    labels[[1, 6]] = -100
    for chunk_size in (1, 2, 5, 13, 100, None):
        for rows in (1, 3, 1000):
            with pointwise_rows(rows * 29):
                record(
                    results,
                    f"live/tiling/chunk={chunk_size}/rows={rows}",
                    lambda h, c=chunk_size: live_ab(
                        h, 0.2, 0.7, labels=labels, ce_weight=0.5, reduction="none", chunk_size=c
                    ),
                    heads,
                )
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    record(
        results,
        "live/no_bias_3d",
        lambda h: live_ab(h, 0.2, 0.7, mask=mask, reduction="none"),
        make_heads(positions=(3, 4), bias=False, seed=6),
    )
    heads = make_heads(positions=(2, 9), vocab=31, seed=9, dtype=torch.float32)
    labels = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(9))
    labels[0, :3] = -100
    for weights in ((1.0, 0.0), (0.3, 0.7), (0.0, 1.0)):
        for reduction in ("none", "sum", "mean"):
            record(
                results,
                f"live/labels/{weights}/{reduction}",
                lambda h, w=weights, r=reduction: live_ab(
                    h,
                    0.2,
                    0.7,
                    labels=labels,
                    divergence_weight=w[0],
                    ce_weight=w[1],
                    reduction=r,
                    chunk_size=4,
                ),  # fmt: skip
                heads,
            )
    heads = make_heads(positions=(3, 7), vocab=37, student_rows=40, seed=21, dtype=torch.float32)
    labels = torch.randint(0, 37, (3, 7), generator=torch.Generator().manual_seed(21))
    labels[1, :4] = -100
    for temperature in (1.0, 2.0):
        for transform in ({}, {"student_logit_softcap": 3.0}):
            record(
                results,
                f"live/entropies/T={temperature}/{sorted(transform)}",
                lambda h, t=temperature, x=transform: live(
                    h,
                    "ab",
                    divergence_params={"alpha": 0.2, "beta": 0.7},
                    temperature=t,
                    labels=labels,
                    reduction="none",
                    vocab_size=37,
                    chunk_size=5,
                    **x,
                ),  # fmt: skip
                heads,
            )
    record(
        results,
        "live/all_masked",
        lambda h: live_ab(h, 0.2, 0.7, labels=torch.full((13,), -100), ce_weight=0.5),
        make_heads(seed=10),
    )


def live_precision_cases(results: Results) -> None:
    """16-bit parameters, autocast (the GEMM dtype choice), no-grad mode, larger shapes."""
    heads = make_heads(positions=(16,), vocab=64, dtype=torch.bfloat16, seed=14)
    record(results, "live/bf16", lambda h: live_ab(h, 0.2, 0.7), heads)
    heads = make_heads(positions=(40,), vocab=96, dtype=torch.float32, seed=30)
    labels = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(30))
    labels[::7] = -100
    for reduction in ("sum", "none"):

        def autocast_run(h, r=reduction):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return live_ab(h, 0.2, 0.7, labels=labels, ce_weight=0.3, divergence_weight=0.7,
                               reduction=r, chunk_size=16)  # fmt: skip

        record(results, f"live/autocast_bf16/{reduction}", autocast_run, heads)
    heads = make_heads(positions=(64,), vocab=512, hidden_student=256, dtype=torch.float32, seed=12)
    record(
        results, "live/no_grad", lambda h: live_ab(h, 0.2, 0.7, chunk_size=16), heads, grad=False
    )
    record(results, "live/large", lambda h: live_ab(h, 0.2, 0.7, chunk_size=16), heads)


def cache_of(teacher_logits: torch.Tensor, mask: torch.Tensor | None, k: int) -> CachedTeacher:
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return CachedTeacher.from_logits(rows, k)


def random_mask(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask.view(-1)[0] = True
    return mask


def logits_of(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def coarsened_cases(results: Results) -> None:
    """`coarsened_divergence` on the cases of test_coarsened.py."""
    vocab = 37
    student = {"student_hidden": logits_of(0, 3, 5, vocab)}
    teacher = logits_of(1, 3, 5, vocab)
    mask = random_mask((3, 5))
    cached = cache_of(teacher, mask, vocab)
    for name, params in DIVERGENCE_CASES:
        for temperature in (1.0, 2.0):
            record(
                results,
                f"coarsened/full_k/{case_id(name, params)}/T={temperature}",
                lambda s, n=name, p=params, t=temperature: coarsened_divergence(
                    s["student_hidden"],
                    cached,
                    n,
                    divergence_params=p,
                    temperature=t,
                    mask=mask,
                    reduction="none",
                ),  # fmt: skip
                student,
            )
    student = {"student_hidden": logits_of(2, 12, vocab)}
    teacher = logits_of(3, 12, vocab)
    for k in (1, 4, vocab - 1):
        cached = cache_of(teacher, None, k)
        for name, params in DIVERGENCE_CASES:
            record(
                results,
                f"coarsened/small_k/{k}/{case_id(name, params)}",
                lambda s, n=name, p=params, c=cached: coarsened_divergence(
                    s["student_hidden"],
                    c,
                    n,
                    divergence_params=p,
                    temperature=1.5,
                    reduction="none",
                ),  # fmt: skip
                student,
            )
    student = {"student_hidden": logits_of(6, 2, 4, vocab)}
    mask = random_mask((2, 4))
    cached = cache_of(logits_of(7, 2, 4, vocab), mask, 5)
    for reduction in ("none", "sum", "mean"):
        record(
            results,
            f"coarsened/reduction/{reduction}",
            lambda s, r=reduction: coarsened_divergence(
                s["student_hidden"], cached, "fkl", mask=mask, reduction=r
            ),
            student,
        )


def fused_cached(leaves: dict, cached: CachedTeacher, *args, **kwargs):
    return fused_linear_coarsened_divergence(
        leaves["student_hidden"],
        leaves["student_weight"],
        cached,
        *args,
        student_bias=leaves["student_bias"],
        **kwargs,
    )


def fused_coarsened_cases(results: Results) -> None:
    """`fused_linear_coarsened_divergence` on the cases of test_coarsened.py, and more."""
    vocab, k = 29, 6
    generator = torch.Generator().manual_seed(11)
    student = {
        "student_hidden": logits_of(10, 3, 7, 8, scale=1.0),
        "student_weight": torch.randn(32, 8, generator=generator),
        "student_bias": torch.randn(32, generator=generator),
    }
    labels = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(12))
    labels[0, :2] = -100
    labels[2, 5] = -100
    mask = labels != -100
    cached = cache_of(logits_of(13, 3, 7, vocab), mask, k)
    for name, params in ONE_PER_NAME:
        for reduction in ("sum", "mean", "none"):
            record(
                results,
                f"fused_cached/{case_id(name, params)}/{reduction}",
                lambda s, n=name, p=params, r=reduction: fused_cached(
                    s,
                    cached,
                    n,
                    divergence_params=p,
                    temperature=1.3,
                    reduction=r,
                    student_logit_scale=0.8,
                    student_logit_softcap=20.0,
                    vocab_size=vocab,
                    labels=labels,
                    divergence_weight=0.7,
                    ce_weight=0.3,
                    chunk_size=5,
                ),  # fmt: skip
                student,
            )
    for chunk_size in (1, 4, 100):
        for rows in (1, 3, 1000):
            with pointwise_rows(rows * vocab):
                record(
                    results,
                    f"fused_cached/tiling/chunk={chunk_size}/rows={rows}",
                    lambda s, c=chunk_size: fused_cached(
                        s,
                        cached,
                        "ab",
                        divergence_params={"alpha": 0.2, "beta": 0.7},
                        vocab_size=vocab,
                        labels=labels,
                        ce_weight=0.5,
                        reduction="none",
                        chunk_size=c,
                    ),  # fmt: skip
                    student,
                )
    for reduction in ("sum", "none"):
        record(
            results,
            f"fused_cached/mask_no_labels/{reduction}",
            lambda s, r=reduction: fused_cached(
                s, cached, "rkl", mask=mask, vocab_size=vocab, reduction=r, chunk_size=4
            ),
            student,
        )
    fused_coarsened_precision_cases(results)


def fused_coarsened_precision_cases(results: Results) -> None:
    vocab = 23
    generator = torch.Generator().manual_seed(15)
    student = {
        "student_hidden": logits_of(14, 9, 8, scale=1.0),
        "student_weight": torch.randn(vocab, 8, generator=generator),
        "student_bias": None,
    }
    cached = cache_of(logits_of(16, 9, vocab), None, vocab)
    record(
        results,
        "fused_cached/no_grad",
        lambda s: fused_cached(s, cached, "jsd", reduction="mean"),
        student,
        grad=False,
    )
    labels = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(17))
    cached = cache_of(logits_of(18, 9, vocab), None, 5)
    bf16 = {name: None if t is None else t.to(torch.bfloat16) for name, t in student.items()}
    record(
        results,
        "fused_cached/bf16",
        lambda s: fused_cached(s, cached, "fkl", labels=labels, ce_weight=0.2, chunk_size=4),
        bf16,
    )
    for reduction in ("sum", "none"):

        def autocast_run(s, r=reduction):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fused_cached(
                    s, cached, "ab", divergence_params={"alpha": 0.2, "beta": 0.7},
                    labels=labels, ce_weight=0.2, divergence_weight=0.8, reduction=r,
                    chunk_size=4,
                )  # fmt: skip

        record(results, f"fused_cached/autocast_bf16/{reduction}", autocast_run, student)


def collect() -> Results:
    torch.set_num_threads(1)
    results: Results = {}
    live_cases(results)
    coarsened_cases(results)
    fused_coarsened_cases(results)
    return results


def compare(before: Results, after: Results) -> list[str]:
    """The keys whose tensors differ (or exist on one side only)."""
    problems = [f"only before: {key}" for key in sorted(set(before) - set(after))]
    problems += [f"only after: {key}" for key in sorted(set(after) - set(before))]
    for key in sorted(set(before) & set(after)):
        old, new = before[key], after[key]
        if old.dtype != new.dtype or not torch.equal(old, new):
            problems.append(f"differs: {key} ({old.dtype} vs {new.dtype})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="run the cases and save their tensors")
    save.add_argument("path")
    check = commands.add_parser("compare", help="compare two saved runs with torch.equal")
    check.add_argument("before")
    check.add_argument("after")
    args = parser.parse_args(argv)
    if args.command == "save":
        results = collect()
        torch.save(results, args.path)
        print(f"{len(results)} tensors from {divergences_package.__file__} -> {args.path}")
        return 0
    before, after = torch.load(args.before), torch.load(args.after)
    problems = compare(before, after)
    cases = {key.rsplit("/", 1)[0] for key in before}
    for problem in problems:
        print(problem)
    verdict = "DIFFERENT" if problems else "torch.equal on every tensor"
    print(f"{len(cases)} cases, {len(before)} / {len(after)} tensors: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
