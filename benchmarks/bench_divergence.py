#!/usr/bin/env python
"""Peak extra memory and forward+backward time of token-level distillation losses.

Each case runs in a fresh Python process, so that the peak resident set size (RSS) of one case is
not inflated by what an earlier case left in the allocator. Inside that process the case is first
run once at a tiny shape (imports, thread pools and kernels are initialised there), then its
inputs are allocated at full size, the kernel's peak-RSS counter is reset, and forward+backward runs
``warmup + repeats`` times:

* **extra memory** = peak RSS over those runs minus RSS right after the inputs were allocated: what
  the loss itself costs on top of the logits the model already produced. The student logits'
  ``.grad`` counts as extra (every case produces one).
* **time** = median wall-clock seconds of the ``repeats`` timed runs (warm-up runs excluded).

Cases (``--cases``; see ``CASES``):

* ``naive_ab``: the alpha-beta divergence as the authors' code computes it (fp32 softmaxes of both
  logit sets, ``torch.pow`` on full ``(tokens, V)`` tensors, a masked mean), plain autograd.
* ``ours_ab``: ``abkd_trainer.ab_divergence`` (chunked; default ``chunk_size``).
* ``trl_gkd_jsd``: TRL's ``GKDTrainer.generalized_jsd_loss`` (beta=0.5), plain autograd.
* ``ours_jsd``: ``abkd_trainer.generalized_jsd`` (beta=0.5), the same objective as ``trl_gkd_jsd``.

Logits are ``(1, tokens, V)`` in ``--dtype``, drawn from N(0, 2^2) (student) and N(0, 3^2)
(teacher); every position is supervised (an all-true mask, or labels with no -100, is passed).
The reported loss values let one check that cases computing the same objective agree.

Fused cases (``FUSED_CASES``) start one step earlier, from final hidden states ``(tokens, H)`` and
LM-head weights ``(V, H)`` (``--hidden``), scaled so that the logits have the spreads above; the
student's hidden states and head weight receive gradients, and their ``.grad`` counts as extra:

* ``fused_naive_ab``: both models' logits materialised by ``hidden @ weight.T``, then ``naive_ab``.
* ``fused_ours_ab``, ``fused_ours_jsd``, ``fused_ours_fkl``: ``abkd_trainer.fused_linear_*``.
* ``fused_trl_jsd``, ``fused_trl_kl``: TRL's ``trl.kernels.chunked_divergence.
  ChunkedDivergenceFunction`` (beta 0.5 and 0, i.e. forward KL), the kernel of its
  ``DistillationTrainer``.
* ``fused_liger_jsd``: Liger-Kernel's ``LigerFusedLinearJSDLoss(compiled=False)`` with the hard
  (cross-entropy) loss weighted 0; needs the ``bench`` extra (``pip install -e ".[bench]"``).

``--device cuda`` runs any case on the GPU, measuring peak extra *GPU* memory (the caching
allocator's ``max_memory_allocated``) and synchronising around each timed run.

Reading the timings: on a CPU shared with other processes (load average above the core count,
recorded in the output), OpenMP threads that busy-wait at the end of every parallel op make a loss
built of many small ops -- the chunked ones -- up to ~10x slower, while a few large ops (the naive
ones) suffer little. Compare timings taken at a low load, or with ``--threads 1`` or
``OMP_WAIT_POLICY=PASSIVE`` (both recorded in the output). Memory figures are not affected.

To add a case, write ``build(settings) -> CaseRun`` and decorate it with ``register_case``.

Examples::

    python benchmarks/bench_divergence.py                          # 4096 x 32000, fp32
    python benchmarks/bench_divergence.py --tokens 2048 --cases naive_ab ours_ab
    python benchmarks/bench_divergence.py --tokens 64 --vocab 512 --json
    python benchmarks/bench_divergence.py --hidden 512 --cases fused_trl_jsd fused_ours_ab
    benchmarks/gpu_check.sh                                         # fused cases, CUDA, bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Hyper-parameters of the compared objectives: the authors' GPT-2 recipe, and TRL's default JSD.
AB_ALPHA = 0.2
AB_BETA = 0.7
JSD_BETA = 0.5
# Standard deviations of the random logits: the teacher a little more peaked than the student.
STUDENT_LOGIT_STD = 2.0
TEACHER_LOGIT_STD = 3.0
# Shape of the untimed, unmeasured first run that initialises imports, thread pools and kernels.
PRIME_TOKENS = 8
PRIME_VOCAB = 256
PRIME_HIDDEN = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Losses of cases with the same objective must agree to this relative tolerance. Some
# implementations (TRL's) compute in the logits' dtype, so half precision gets a looser bound.
AGREEMENT_RTOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 5e-3}


@dataclass(frozen=True)
class BenchSettings:
    """What every case is measured at.

    ``tokens`` x ``vocab`` is the logits shape; ``dtype`` names the logits' dtype (a key of
    ``DTYPES``); ``chunk_size`` is passed to our chunked losses (None: the library default).
    Fused cases start from ``(tokens, hidden)`` hidden states and ``(vocab, hidden)`` heads;
    every case allocates its inputs on ``device``.
    """

    tokens: int = 4096
    vocab: int = 32000
    dtype: str = "float32"
    chunk_size: int | None = None
    seed: int = 0
    hidden: int = 512
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class CaseRun:
    """A built case: ``loss_fn()`` runs the forward pass and returns a scalar loss.

    ``leaves`` are the tensors that receive gradients; the harness clears their ``.grad`` before
    each run so that every run allocates its gradient afresh, as a training step does.
    """

    loss_fn: Callable[[], torch.Tensor]
    leaves: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    ``build(settings)`` allocates the inputs and returns a :class:`CaseRun`; it should import what
    it needs inside, so that a missing optional dependency only fails this case. ``objective``
    names what is computed (cases with equal objectives must report equal losses); ``reference``
    names the case this one's memory and time ratios are taken against.
    """

    name: str
    description: str
    objective: str
    build: Callable[[BenchSettings], CaseRun]
    reference: str | None = None


CASES: dict[str, Case] = {}


def register_case(
    name: str, description: str, objective: str, reference: str | None = None
) -> Callable[[Callable[[BenchSettings], CaseRun]], Callable[[BenchSettings], CaseRun]]:
    """Decorator adding a ``build(settings) -> CaseRun`` function to ``CASES``."""

    def decorator(build: Callable[[BenchSettings], CaseRun]) -> Callable[[BenchSettings], CaseRun]:
        if name in CASES:
            raise ValueError(f"Benchmark case {name!r} is registered twice.")
        CASES[name] = Case(name, description, objective, build, reference)
        return build

    return decorator


# ----------------------------------------------------------------------------- inputs and losses


def make_logits(settings: BenchSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(1, tokens, V)`` student (requires grad) and teacher logits, and a ``(1, tokens)``
    all-true mask. Generated directly in the target dtype and scaled in place, so that creating
    the inputs leaves no transient copy behind."""
    generator = torch.Generator(settings.device).manual_seed(settings.seed)
    shape = (1, settings.tokens, settings.vocab)
    options = {"generator": generator, "dtype": settings.torch_dtype, "device": settings.device}
    student = torch.randn(shape, **options)
    teacher = torch.randn(shape, **options)
    student.mul_(STUDENT_LOGIT_STD).requires_grad_(True)
    teacher.mul_(TEACHER_LOGIT_STD)
    mask = torch.ones(shape[:-1], dtype=torch.bool, device=settings.device)
    return student, teacher, mask


@dataclass
class HiddenStates:
    """Inputs of the fused cases: both models' final hidden states and LM-head weights."""

    student_hidden: torch.Tensor  # (tokens, H), requires grad
    student_weight: torch.Tensor  # (V, H), requires grad
    teacher_hidden: torch.Tensor  # (tokens, H)
    teacher_weight: torch.Tensor  # (V, H)

    @property
    def student_leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student_hidden, self.student_weight


def make_hidden_states(settings: BenchSettings) -> HiddenStates:
    """Random N(0, 1) hidden states and heads with N(0, std^2 / H) entries, so that the logits
    ``hidden @ weight.T`` have the spreads of ``make_logits`` (2 student, 3 teacher)."""
    generator = torch.Generator(settings.device).manual_seed(settings.seed)
    options = {"generator": generator, "dtype": settings.torch_dtype, "device": settings.device}
    rows, width, vocab = settings.tokens, settings.hidden, settings.vocab
    inputs = HiddenStates(
        student_hidden=torch.randn(rows, width, **options),
        student_weight=torch.randn(vocab, width, **options).mul_(STUDENT_LOGIT_STD / width**0.5),
        teacher_hidden=torch.randn(rows, width, **options),
        teacher_weight=torch.randn(vocab, width, **options).mul_(TEACHER_LOGIT_STD / width**0.5),
    )
    for leaf in inputs.student_leaves:
        leaf.requires_grad_(True)
    return inputs


def naive_ab_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Alpha-beta divergence written the way the ABKD authors' code computes it (general case).

    Mirrors the tensor operations of ``ab_div`` in the authors' ``distillation_llm/distillm/
    losses.py`` (ghwang-s/abkd): fp32 softmaxes of both ``(B, S, V)`` logit sets, ``torch.pow`` of
    the probabilities, the combination built with in-place ops, zeros where a logit is infinite,
    a sum over the vocabulary and a mean over the mask-true positions. Plain autograd keeps the
    softmaxes and powers alive until backward; that is the memory this benchmark measures.

    Args:
        student_logits, teacher_logits: ``(B, S, V)``.
        mask: ``(B, S)`` bool, True at supervised positions.
        alpha, beta: non-zero, with ``alpha + beta != 0`` (the only branch benchmarked).

    Returns:
        Scalar fp32 loss (nats per supervised token).
    """
    if alpha == 0 or beta == 0 or alpha + beta == 0:
        raise ValueError(
            f"naive_ab_divergence implements the general case only; got alpha={alpha}, "
            f"beta={beta}. Pick alpha != 0, beta != 0 and alpha + beta != 0."
        )
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(student_logits, dim=-1, dtype=torch.float32)
    infinite = torch.isinf(student_logits) | torch.isinf(teacher_logits)

    cross = torch.pow(teacher_probs, alpha)
    cross.mul_(torch.pow(student_probs, beta))
    cross.masked_fill_(infinite, 0.0)
    teacher_term = torch.pow(teacher_probs, alpha + beta)
    teacher_term.mul_(alpha / (alpha + beta)).masked_fill_(infinite, 0.0)
    cross.sub_(teacher_term)
    del teacher_term
    student_term = torch.pow(student_probs, alpha + beta)
    student_term.mul_(beta / (alpha + beta)).masked_fill_(infinite, 0.0)
    cross.sub_(student_term)
    del student_term
    per_token = -torch.sum(cross, dim=-1) / (alpha * beta)

    weights = mask.float()
    return torch.sum(per_token * weights) / torch.sum(weights)


# ----------------------------------------------------------------------------- the cases


@register_case(
    "naive_ab",
    f"authors' closed form, fp32 softmax + torch.pow, autograd (a={AB_ALPHA}, b={AB_BETA})",
    objective=f"ab({AB_ALPHA},{AB_BETA})",
)
def _build_naive_ab(settings: BenchSettings) -> CaseRun:
    student, teacher, mask = make_logits(settings)
    return CaseRun(
        loss_fn=lambda: naive_ab_divergence(student, teacher, mask, AB_ALPHA, AB_BETA),
        leaves=(student,),
    )


@register_case(
    "ours_ab",
    f"abkd_trainer.ab_divergence, chunked (a={AB_ALPHA}, b={AB_BETA})",
    objective=f"ab({AB_ALPHA},{AB_BETA})",
    reference="naive_ab",
)
def _build_ours_ab(settings: BenchSettings) -> CaseRun:
    from abkd_trainer import ab_divergence

    student, teacher, mask = make_logits(settings)
    return CaseRun(
        loss_fn=lambda: ab_divergence(
            student, teacher, AB_ALPHA, AB_BETA, mask=mask, chunk_size=settings.chunk_size
        ),
        leaves=(student,),
    )


@register_case(
    "trl_gkd_jsd",
    f"trl GKDTrainer.generalized_jsd_loss, autograd (beta={JSD_BETA})",
    objective=f"jsd({JSD_BETA})",
    reference="naive_ab",
)
def _build_trl_gkd_jsd(settings: BenchSettings) -> CaseRun:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    student, teacher, mask = make_logits(settings)
    labels = torch.zeros(mask.shape, dtype=torch.long)  # no -100: every position supervised
    return CaseRun(
        loss_fn=lambda: GKDTrainer.generalized_jsd_loss(
            student, teacher, labels=labels, beta=JSD_BETA
        ),
        leaves=(student,),
    )


@register_case(
    "ours_jsd",
    f"abkd_trainer.generalized_jsd, chunked (beta={JSD_BETA})",
    objective=f"jsd({JSD_BETA})",
    reference="trl_gkd_jsd",
)
def _build_ours_jsd(settings: BenchSettings) -> CaseRun:
    from abkd_trainer import generalized_jsd

    student, teacher, mask = make_logits(settings)
    return CaseRun(
        loss_fn=lambda: generalized_jsd(
            student, teacher, beta=JSD_BETA, mask=mask, chunk_size=settings.chunk_size
        ),
        leaves=(student,),
    )


DEFAULT_CASES: tuple[str, ...] = ("naive_ab", "ours_ab", "trl_gkd_jsd", "ours_jsd")


@register_case(
    "fused_naive_ab",
    f"logits = hidden @ weight.T materialised, then naive_ab (a={AB_ALPHA}, b={AB_BETA})",
    objective=f"fused-ab({AB_ALPHA},{AB_BETA})",
)
def _build_fused_naive_ab(settings: BenchSettings) -> CaseRun:
    inputs = make_hidden_states(settings)
    mask = torch.ones(1, settings.tokens, dtype=torch.bool, device=settings.device)

    def loss_fn() -> torch.Tensor:
        student_logits = inputs.student_hidden @ inputs.student_weight.T
        with torch.no_grad():
            teacher_logits = inputs.teacher_hidden @ inputs.teacher_weight.T
        return naive_ab_divergence(
            student_logits.unsqueeze(0), teacher_logits.unsqueeze(0), mask, AB_ALPHA, AB_BETA
        )

    return CaseRun(loss_fn=loss_fn, leaves=inputs.student_leaves)


@register_case(
    "fused_ours_ab",
    f"abkd_trainer.fused_linear_ab_divergence (a={AB_ALPHA}, b={AB_BETA})",
    objective=f"fused-ab({AB_ALPHA},{AB_BETA})",
    reference="fused_trl_jsd",
)
def _build_fused_ours_ab(settings: BenchSettings) -> CaseRun:
    from abkd_trainer import fused_linear_ab_divergence

    inputs = make_hidden_states(settings)
    return CaseRun(
        loss_fn=lambda: fused_linear_ab_divergence(
            *_fused_args(inputs), AB_ALPHA, AB_BETA, chunk_size=settings.chunk_size
        ),
        leaves=inputs.student_leaves,
    )


def _fused_divergence_case(name: str, params: dict[str, float]) -> Callable[..., CaseRun]:
    def build(settings: BenchSettings) -> CaseRun:
        from abkd_trainer import fused_linear_divergence

        inputs = make_hidden_states(settings)
        return CaseRun(
            loss_fn=lambda: fused_linear_divergence(
                *_fused_args(inputs),
                name,
                divergence_params=params,
                chunk_size=settings.chunk_size,
            ),
            leaves=inputs.student_leaves,
        )

    return build


def _fused_args(inputs: HiddenStates) -> tuple[torch.Tensor, ...]:
    return (
        inputs.student_hidden,
        inputs.student_weight,
        inputs.teacher_hidden,
        inputs.teacher_weight,
    )


register_case(
    "fused_ours_jsd",
    f"abkd_trainer.fused_linear_divergence('jsd', beta={JSD_BETA})",
    objective=f"fused-jsd({JSD_BETA})",
    reference="fused_trl_jsd",
)(_fused_divergence_case("jsd", {"beta": JSD_BETA}))
register_case(
    "fused_ours_fkl",
    "abkd_trainer.fused_linear_divergence('fkl'), forward KL",
    objective="fused-fkl",
    reference="fused_trl_kl",
)(_fused_divergence_case("fkl", {}))


def _trl_chunked_divergence_case(beta: float) -> Callable[..., CaseRun]:
    def build(settings: BenchSettings) -> CaseRun:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        inputs = make_hidden_states(settings)

        def loss_fn() -> torch.Tensor:
            per_token, _entropy = ChunkedDivergenceFunction.apply(
                inputs.student_hidden,
                inputs.student_weight,
                None,
                inputs.teacher_hidden,
                inputs.teacher_weight,
                None,
                beta,
            )
            return per_token.mean()

        return CaseRun(loss_fn=loss_fn, leaves=inputs.student_leaves)

    return build


register_case(
    "fused_trl_jsd",
    f"trl ChunkedDivergenceFunction (beta={JSD_BETA}), 4096 x 32768 tiles",
    objective=f"fused-jsd({JSD_BETA})",
)(_trl_chunked_divergence_case(JSD_BETA))
register_case(
    "fused_trl_kl",
    "trl ChunkedDivergenceFunction (beta=0: forward KL), 4096 x 32768 tiles",
    objective="fused-fkl",
)(_trl_chunked_divergence_case(0.0))


@register_case(
    "fused_liger_jsd",
    f"liger_kernel LigerFusedLinearJSDLoss(compiled=False, beta={JSD_BETA}), soft loss only",
    objective=f"fused-jsd({JSD_BETA})",
    reference="fused_trl_jsd",
)
def _build_fused_liger_jsd(settings: BenchSettings) -> CaseRun:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as error:
        raise ImportError(
            f"{error}. The Liger case needs the bench extra: pip install -e '.[bench]'."
        ) from None

    inputs = make_hidden_states(settings)
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA, compiled=False
    )
    labels = torch.zeros(settings.tokens, dtype=torch.long, device=settings.device)
    return CaseRun(loss_fn=lambda: loss(*_fused_args(inputs), labels), leaves=inputs.student_leaves)


FUSED_CASES: tuple[str, ...] = (
    "fused_naive_ab",
    "fused_trl_jsd",
    "fused_ours_ab",
    "fused_ours_jsd",
    "fused_liger_jsd",
    "fused_trl_kl",
    "fused_ours_fkl",
)


# ----------------------------------------------------------------------------- measurement


class PeakRSS:
    """Current and peak resident set size of this process, in bytes.

    On Linux the peak (``VmHWM``) can be reset by writing ``5`` to ``/proc/self/clear_refs``,
    which makes the peak of one region of code measurable. Where that is unavailable the peak
    since process start (``ru_maxrss``) is used; inputs are generated without transient copies,
    so that peak is then the RSS right after allocating them.
    """

    def __init__(self) -> None:
        self.resettable = self._reset_kernel_peak()
        self.method = (
            "VmHWM reset via /proc/self/clear_refs"
            if self.resettable
            else "ru_maxrss (peak since process start)"
        )

    @staticmethod
    def _reset_kernel_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Start a new measurement region (a no-op with the ``ru_maxrss`` fallback)."""
        if self.resettable:
            self._reset_kernel_peak()

    @staticmethod
    def current() -> int:
        import psutil  # a dependency of accelerate, hence of this package

        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self.resettable:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # reported in KiB
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class PeakCudaMemory:
    """Current and peak memory of the CUDA caching allocator (what tensors hold), in bytes."""

    method = "torch.cuda.max_memory_allocated"

    @staticmethod
    def current() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    @staticmethod
    def reset() -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def peak() -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _forward_backward(run: CaseRun, device: str = "cpu") -> tuple[float, float]:
    """One training-step-like pass; returns (seconds, loss value)."""
    for leaf in run.leaves:
        leaf.grad = None
    _synchronize(device)  # GPU work is asynchronous: time it from an idle device to completion
    start = time.perf_counter()
    loss = run.loss_fn()
    loss.backward()
    _synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, float(loss.detach())


def measure_case(case: Case, settings: BenchSettings, warmup: int, repeats: int) -> dict[str, Any]:
    """Measure one case in the current process (call it in a fresh process; see module doc)."""
    prime = dataclasses.replace(
        settings,
        tokens=min(settings.tokens, PRIME_TOKENS),
        vocab=min(settings.vocab, PRIME_VOCAB),
        hidden=min(settings.hidden, PRIME_HIDDEN),
    )
    _forward_backward(case.build(prime), settings.device)

    meter = PeakCudaMemory() if torch.device(settings.device).type == "cuda" else PeakRSS()
    run = case.build(settings)
    baseline = meter.current()
    meter.reset()
    times, losses = [], []
    for _ in range(warmup + repeats):
        seconds, loss = _forward_backward(run, settings.device)
        times.append(seconds)
        losses.append(loss)
    peak = meter.peak()
    timed = times[warmup:]
    return {
        "case": case.name,
        "description": case.description,
        "objective": case.objective,
        "reference": case.reference,
        "extra_peak_mib": max(0, peak - baseline) / 2**20,
        "baseline_rss_mib": baseline / 2**20,
        "peak_rss_mib": peak / 2**20,
        "time_s_median": statistics.median(timed),
        "times_s": timed,
        "loss": losses[-1],
        "peak_method": meter.method,
        "torch_threads": torch.get_num_threads(),
    }


def run_case_in_subprocess(
    name: str, settings: BenchSettings, warmup: int, repeats: int, threads: int | None
) -> dict[str, Any]:
    """Run ``name`` in a fresh interpreter executing this file; returns its result or an error."""
    command = [sys.executable, os.path.abspath(__file__), "--_worker", name]
    command += _settings_to_argv(settings) + ["--warmup", str(warmup), "--repeats", str(repeats)]
    if threads is not None:
        command += ["--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        if completed.returncode < 0:
            reason = f"killed by signal {-completed.returncode} (out of memory?)"
        else:
            last_lines = completed.stderr.strip().splitlines()[-3:]
            reason = " | ".join(last_lines) or f"exit status {completed.returncode}"
        return {"case": name, "error": reason}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _settings_to_argv(settings: BenchSettings) -> list[str]:
    flags = {"--tokens": settings.tokens, "--vocab": settings.vocab, "--dtype": settings.dtype}
    flags.update({"--seed": settings.seed, "--chunk-size": settings.chunk_size})
    flags.update({"--hidden": settings.hidden, "--device": settings.device})
    return [
        str(item) for flag, value in flags.items() if value is not None for item in (flag, value)
    ]


# ----------------------------------------------------------------------------- reporting


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Give each result whose reference was measured ``memory_ratio`` and ``time_ratio``."""
    by_name = {result["case"]: result for result in results if "error" not in result}
    for result in by_name.values():
        reference = by_name.get(result.get("reference") or "")
        if reference is None:
            continue
        result["memory_ratio"] = _ratio(result["extra_peak_mib"], reference["extra_peak_mib"])
        result["time_ratio"] = _ratio(result["time_s_median"], reference["time_s_median"])


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def disagreements(results: list[dict[str, Any]], rtol: float) -> list[str]:
    """Messages for non-finite losses, and for cases whose objective matches an earlier case's but
    whose loss differs from it by more than ``rtol`` (relative)."""
    first_by_objective: dict[str, dict[str, Any]] = {}
    messages = []
    for result in results:
        if "error" in result:
            continue
        if not math.isfinite(result["loss"]):
            messages.append(f"{result['case']}: loss is {result['loss']}")
            continue
        first = first_by_objective.setdefault(result["objective"], result)
        if first is not result and not math.isclose(
            result["loss"], first["loss"], rel_tol=rtol, abs_tol=1e-6
        ):
            messages.append(
                f"{result['case']} loss {result['loss']:.6g} differs from {first['case']} "
                f"loss {first['loss']:.6g} (same objective {result['objective']})"
            )
    return messages


def machine_info(threads: int, load_average: float | None, device: str = "cpu") -> dict[str, Any]:
    """What the timings depend on; ``load_average`` is the 1-minute load when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average,
        "gpu": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else None,
        # Busy-waiting OpenMP threads make many small ops very slow on an oversubscribed CPU.
        "openmp_env": {
            name: value for name, value in os.environ.items() if name.startswith("OMP_")
        },
    }


def load_average() -> float | None:
    """1-minute load average: above the CPU count, other processes are slowing the timings."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def format_header(report: dict[str, Any]) -> str:
    """One line saying what was measured and on what."""
    settings, machine = report["settings"], report["machine"]
    load = machine["load_average_at_start"]
    parts = [
        f"logits {settings['tokens']} x {settings['vocab']} {settings['dtype']}",
        f"fused cases: hidden {settings['hidden']}",
        f"median of {report['repeats']} after {report['warmup']} warm-up",
        *([f"GPU {machine['gpu']}"] if machine.get("gpu") else []),
        f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs",
        f"torch {machine['torch']}, {machine['torch_threads']} threads",
        "load average at start " + ("unknown" if load is None else f"{load:.1f}"),
        *(f"{name}={value}" for name, value in machine["openmp_env"].items()),
    ]
    return "; ".join(parts)


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("case", "extra peak MiB", "x ref", "fwd+bwd s", "x ref", "ref", "loss")
    rows = [header]
    for result in results:
        if "error" in result:
            rows.append((result["case"], "failed", "", "", "", "", result["error"][:120]))
            continue
        rows.append(
            (
                result["case"],
                f"{result['extra_peak_mib']:.0f}",
                _format_ratio(result.get("memory_ratio")),
                f"{result['time_s_median']:.3f}",
                _format_ratio(result.get("time_ratio")),
                result.get("reference") if "memory_ratio" in result else "",
                f"{result['loss']:.6g}",
            )
        )
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _format_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


# ----------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Peak extra memory and forward+backward time of distillation losses, "
        "one fresh process per case.",
    )
    parser.add_argument(
        "--tokens", type=_positive_int, default=4096, help="tokens (rows of the logits)"
    )
    parser.add_argument("--vocab", type=_positive_int, default=32000, help="vocabulary size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="logits dtype")
    parser.add_argument(
        "--hidden", type=_positive_int, default=512, help="hidden size of the fused cases' heads"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where inputs live and cases run (cuda: peak GPU memory is measured)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        default=list(DEFAULT_CASES),
        metavar="CASE",
        help=f"cases to run, in order (default: {' '.join(DEFAULT_CASES)}; fused ones: "
        f"{' '.join(FUSED_CASES)})",
    )
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per case")
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=1, help="untimed runs before the timed ones"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=None, help="tokens per chunk for our losses"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random logits")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table"
    )
    parser.add_argument("--_worker", metavar="CASE", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(
        tokens=args.tokens,
        vocab=args.vocab,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        seed=args.seed,
        hidden=args.hidden,
        device=args.device,
    )

    if args._worker is not None:
        result = measure_case(CASES[args._worker], settings, args.warmup, args.repeats)
        print(json.dumps(result))
        return 0

    load_at_start = load_average()
    results = []
    for name in args.cases:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(
            run_case_in_subprocess(name, settings, args.warmup, args.repeats, args.threads)
        )
    add_ratios(results)
    warnings = disagreements(results, AGREEMENT_RTOL[settings.dtype])
    threads = next(
        (r["torch_threads"] for r in results if "torch_threads" in r), torch.get_num_threads()
    )
    report = {
        "settings": asdict(settings),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": machine_info(threads, load_at_start, settings.device),
        "results": results,
        "warnings": warnings,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_header(report))
        print(format_table(results))
        for result in results:
            if "error" not in result:
                print(f"  {result['case']}: {result['description']}")
        for warning in warnings:
            print(f"WARNING: {warning}")
    failed = any("error" in result for result in results)
    return 1 if failed or warnings else 0


if __name__ == "__main__":
    sys.exit(main())
