"""Generation-based evaluation of a distilled student: ROUGE-L of sampled responses.

The ABKD paper (like MiniLLM and DistiLLM, whose evaluation code it reuses) reports the ROUGE-L
F-measure x 100 between a *sampled* response (temperature 1, top-p 1) and the reference,
averaged over prompts and then over several sampling seeds. `rouge_l_evaluate` does
exactly that for any causal LM and tokenizer; `RougeLCallback` runs it from a
`Trainer`; `teacher_divergence` measures how far a student's next-token
distributions are from the teacher's on the reference responses (teacher forcing).

All three accept an `accelerate.Accelerator`: the prompts are then split over the
processes, every process generates for its share and the results are gathered, so the same
code runs single-process, under DDP and under DeepSpeed ZeRO-3 (where every rank must take
part in every forward pass).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, TrainerCallback, set_seed

# encode_prompt_completion lived here before teacher_forcing.py; the old import path still works.
from abkd_trainer.lm.teacher_forcing import (  # noqa: F401
    Prompt,
    encode_prompt_completion,
    teacher_forcing_batch,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

# Several references per prompt are scored by their best match (as in S-NI / MiniLLM).
Reference = str | Sequence[str]
# divergence(student_logits, teacher_logits, *, mask, reduction) -> fp32 tensor
DivergenceFn = Callable[..., torch.Tensor]

DEFAULT_SEEDS = (0, 1, 2)

_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        # Stemming as in the S-NI / MiniLLM metric code the paper's numbers come from.
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l_score(prediction: str, reference: Reference) -> float:
    """ROUGE-L F-measure x 100 of one prediction; the best over several references.

    `rouge-score` lower-cases, keeps alphanumeric tokens and Porter-stems words longer
    than three letters; the F-measure is `2 * LCS / (len(prediction) + len(reference))`
    in tokens. Empty prediction or reference scores 0.
    """
    references = [reference] if isinstance(reference, str) else list(reference)
    if not references:
        raise ValueError("rouge_l_score needs at least one reference; got an empty list.")
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


@dataclass
class RougeLResult:
    """Mean ROUGE-L (F-measure x 100) of sampled responses.

    Attributes:
        rouge_l: mean over seeds of the mean over prompts.
        rouge_l_std: standard deviation over seeds (0.0 for a single seed).
        per_seed: the mean over prompts for each seed, in `seeds` order.
        seeds: the sampling seeds.
        num_prompts: number of prompts scored.
        samples: the first few (prompt, response, reference) triples of the first seed.
    """

    rouge_l: float
    rouge_l_std: float
    per_seed: list[float]
    seeds: list[int]
    num_prompts: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompts_and_references(
    dataset: Dataset | Sequence[Mapping[str, Any]],
) -> tuple[list[Prompt], list[str]]:
    """Split evaluation rows into prompts and reference responses, in TRL's dataset formats.

    Supported rows: `prompt`/`completion` (text or conversational; a conversational
    completion's assistant contents are joined) and `messages` (the last message must be the
    assistant's reference answer; the messages before it form the prompt).

    Args:
        dataset: the evaluation rows, a `datasets.Dataset` or a list of dicts.

    Returns:
        `(prompts, references)`: one prompt (text or chat messages) and one reference per row.
    """
    prompts: list[Prompt] = []
    references: list[str] = []
    for index, row in enumerate(dataset):
        if "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(completion, list):
                completion = "".join(message["content"] for message in completion)
        elif "messages" in row:
            messages = row["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"Row {index}: the last message must be the assistant's reference answer to "
                    "use a `messages` dataset for generation evaluation."
                )
            prompt, completion = list(messages[:-1]), messages[-1]["content"]
        else:
            raise ValueError(
                f"Row {index} has columns {sorted(row)}; generation evaluation needs `prompt` and "
                "`completion` columns, or a `messages` column (see TRL's dataset formats)."
            )
        prompts.append(prompt)
        references.append(completion)
    return prompts, references


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def _encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`, both (batch, prompt_length)."""
    texts = [_prompt_text(tokenizer, prompt) for prompt in prompts]
    # Plain-text prompts get the tokenizer's special tokens (as SFTTrainer tokenizes them); a
    # rendered chat template already contains them.
    add_special_tokens = isinstance(prompts[0], str)
    original_side, original_pad = tokenizer.padding_side, tokenizer.pad_token
    if original_pad is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token, so prompts cannot be batched; "
                "set `tokenizer.pad_token`."
            )
        tokenizer.pad_token = tokenizer.eos_token  # what SFTTrainer's collator pads with (GPT-2)
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        return tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        )
    finally:
        tokenizer.padding_side = original_side
        if original_pad is None:
            tokenizer.pad_token = None


@contextmanager
def _evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _preserved_rng_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global RNG states on exit."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _unwrap(model: torch.nn.Module, accelerator: Accelerator | None) -> torch.nn.Module:
    # DDP / DeepSpeed engines wrap the module; under ZeRO-3 the module keeps DeepSpeed's hooks,
    # which gather each layer's parameters on the fly (transformers' `generate` sets
    # `synced_gpus` itself so that ranks with shorter outputs keep joining the forward passes).
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _local_share(indices: list[int], accelerator: Accelerator | None) -> list[int]:
    """This process's indices; padded with repeats so every rank runs the same number of batches."""
    if accelerator is None or accelerator.num_processes == 1:
        return indices
    with accelerator.split_between_processes(indices, apply_padding=True) as share:
        return list(share)


def _gather(values: list[Any], total: int, accelerator: Accelerator | None) -> list[Any]:
    if accelerator is None or accelerator.num_processes == 1:
        return values
    from accelerate.utils import gather_object

    # Ranks hold contiguous, equally sized shares; the padding repeats sit at the very end.
    return gather_object(values)[:total]


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    generation_config: GenerationConfig,
    *,
    batch_size: int = 64,
    accelerator: Accelerator | None = None,
) -> list[str]:
    """Decode one response per prompt (special tokens and surrounding whitespace removed)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    indices = _local_share(list(range(len(prompts))), accelerator)
    module = _unwrap(model, accelerator)
    device = next(module.parameters()).device
    responses: list[str] = []
    with _evaluation_mode(module):
        for start in range(0, len(indices), batch_size):
            batch = [prompts[i] for i in indices[start : start + batch_size]]
            inputs = _encode_prompts(tokenizer, batch).to(device)
            output_ids = module.generate(**inputs, generation_config=generation_config)
            new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]
            responses.extend(
                text.strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
    return _gather(responses, len(prompts), accelerator)


def sampling_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """Pure ancestral sampling at `temperature` with nucleus `top_p` and no top-k cut-off."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampled evaluation, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}.")
    pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        # No top-k: transformers' usual top_k=50 would truncate the distribution the paper samples.
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def rouge_l_evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[Reference],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    accelerator: Accelerator | None = None,
    num_samples_kept: int = 5,
) -> RougeLResult:
    """ROUGE-L (F-measure x 100) of sampled responses, mean over prompts, then over seeds.

    Args:
        model: a causal LM with `generate` (or a DDP / DeepSpeed wrapper of one when
            `accelerator` is given).
        tokenizer: its tokenizer; prompts are batched with left padding.
        prompts: plain-text prompts, or chat messages rendered with the tokenizer's chat
            template and a generation prompt.
        references: one reference response (or several, best match counts) per prompt.
        seeds: one sampling pass per seed; `transformers.set_seed(seed)` before each.
        max_new_tokens: response length cap in tokens.
        temperature: sampling temperature (the paper uses 1.0).
        top_p: nucleus sampling threshold in (0, 1] (the paper uses 1.0).
        batch_size: prompts per `generate` call (per process).
        accelerator: split the prompts over its processes and gather the responses.
        num_samples_kept: how many (prompt, response, reference) triples to keep for reports.

    Returns:
        The mean, its spread over seeds, the per-seed means and a few samples.
    """
    if len(prompts) != len(references):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(references)} references; pass one per prompt."
        )
    if not prompts:
        raise ValueError("rouge_l_evaluate needs at least one prompt.")
    if not seeds:
        raise ValueError("rouge_l_evaluate needs at least one sampling seed.")
    generation_config = sampling_config(
        tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    per_seed: list[float] = []
    samples: list[dict[str, Any]] = []
    for seed in seeds:
        set_seed(seed)
        responses = generate_responses(
            model,
            tokenizer,
            prompts,
            generation_config,
            batch_size=batch_size,
            accelerator=accelerator,
        )
        scores = [
            rouge_l_score(response, ref)
            for response, ref in zip(responses, references, strict=True)
        ]
        per_seed.append(sum(scores) / len(scores))
        if not samples:
            samples = [
                {"prompt": prompt, "response": response, "reference": ref}
                for prompt, response, ref in list(zip(prompts, responses, references, strict=True))[
                    :num_samples_kept
                ]
            ]
    return RougeLResult(
        rouge_l=statistics.fmean(per_seed),
        rouge_l_std=statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
        per_seed=per_seed,
        seeds=list(seeds),
        num_prompts=len(prompts),
        samples=samples,
    )


def teacher_divergence(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    divergences: Mapping[str, DivergenceFn],
    *,
    batch_size: int = 64,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Mean per-token divergence between the teacher's and the student's next-token distributions.

    Both models read prompt + reference response (teacher forcing); the divergences are
    averaged over the response tokens (EOS included) of all rows, in nats per token.

    Args:
        student: the student causal LM (or its DDP / DeepSpeed wrapper with `accelerator`).
        teacher: the teacher, over the same vocabulary.
        tokenizer: the tokenizer both models read.
        prompts: plain-text prompts or chat messages, as in `rouge_l_evaluate`.
        references: one reference response per prompt.
        divergences: name -> `fn(student_logits, teacher_logits, *, mask, reduction)`, e.g.
            `{"fkl": abkd_trainer.divergences.get_divergence("fkl")}`; logits are
            (batch, length, vocab) and `mask` (batch, length) bool.
        batch_size: rows per forward pass (per process).
        accelerator: split the rows over its processes and gather the sums.

    Returns:
        name -> mean divergence per response token.
    """
    if len(prompts) != len(references):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(references)} references; pass one per prompt."
        )
    if not divergences:
        raise ValueError("Pass at least one divergence, e.g. {'fkl': get_divergence('fkl')}.")
    indices = _local_share(list(range(len(prompts))), accelerator)
    student_module, teacher_module = _unwrap(student, accelerator), _unwrap(teacher, accelerator)
    device = next(student_module.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    # per row: (number of response tokens, {name: summed divergence})
    rows: list[tuple[int, dict[str, float]]] = []
    with _evaluation_mode(student_module), _evaluation_mode(teacher_module):
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            tensors = teacher_forcing_batch(
                tokenizer, [prompts[i] for i in batch], [references[i] for i in batch], pad_id
            )
            input_ids, attention_mask, response_mask = (tensor.to(device) for tensor in tensors)
            rows.extend(
                _row_divergence_sums(
                    student_module(input_ids=input_ids, attention_mask=attention_mask).logits,
                    teacher_module(input_ids=input_ids, attention_mask=attention_mask).logits,
                    response_mask,
                    divergences,
                )
            )
    rows = _gather(rows, len(prompts), accelerator)
    num_tokens = sum(count for count, _ in rows)
    if num_tokens == 0:
        raise ValueError("No response tokens to compare: every reference is empty.")
    return {name: math.fsum(sums[name] for _, sums in rows) / num_tokens for name in divergences}


def _row_divergence_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    response_mask: torch.Tensor,
    divergences: Mapping[str, DivergenceFn],
) -> list[tuple[int, dict[str, float]]]:
    """Per row: its number of response tokens and each divergence summed over them."""
    per_name = {
        name: fn(student_logits, teacher_logits, mask=response_mask, reduction="none")
        .masked_fill(~response_mask, 0.0)
        .sum(-1)
        .tolist()
        for name, fn in divergences.items()
    }
    counts = response_mask.sum(-1).tolist()
    return [
        (count, {name: values[row] for name, values in per_name.items()})
        for row, count in enumerate(counts)
    ]


class RougeLCallback(TrainerCallback):
    """Log the ROUGE-L of sampled responses as `eval_rouge_l` whenever the trainer evaluates.

    Follows TRL's generation callbacks (`WinRateCallback`, `LogCompletionsCallback`): it
    is built with the trainer it reports to, then added with `trainer.add_callback`.
    Optionally it also scores the student just before the first step and after the last one
    (`student_before` / `student_after`) and the trainer's `teacher_model` once, and
    measures the divergence to the teacher at those two points; everything is kept in
    `results` for reports.

    Example:
        ```python
        callback = RougeLCallback(trainer, prompts, references, evaluate_at_train_boundaries=True)
        trainer.add_callback(callback)
        trainer.train()
        callback.results["student_after"].rouge_l
        ```

    Args:
        trainer: the trainer; its `accelerator` splits the prompts across processes.
        prompts: held-out prompts (see
            [`prompts_and_references`][abkd_trainer.lm.evaluation.prompts_and_references]).
        references: their reference responses, one (or several) per prompt.
        seeds: sampling seeds, as in
            [`rouge_l_evaluate`][abkd_trainer.lm.evaluation.rouge_l_evaluate].
        max_new_tokens: response length cap in tokens.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold in (0, 1].
        batch_size: prompts per `generate` call (per process), and rows per divergence batch.
        evaluate_at_train_boundaries: also evaluate at train begin and end.
        evaluate_teacher: also evaluate `trainer.teacher_model` (once, at train begin).
        divergences: name -> divergence function; when given, the mean per-token divergence
            to the teacher on the references is measured at train begin and end.
        dataset_name: where the prompts come from (a Hub id or a local path), for the
            `model-index` of the model card.
        dataset_split: the split they come from, for the model card.

    `eval_rouge_l` is also put into the metrics of each evaluation, so that
    `metric_for_best_model="rouge_l"` (with `load_best_model_at_end`) keeps the
    checkpoint with the best ROUGE-L, and `EarlyStoppingCallback` can watch it.
    """

    def __init__(
        self,
        trainer: Trainer,
        prompts: Sequence[Prompt],
        references: Sequence[Reference],
        *,
        seeds: Sequence[int] = DEFAULT_SEEDS,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 64,
        evaluate_at_train_boundaries: bool = False,
        evaluate_teacher: bool = False,
        divergences: Mapping[str, DivergenceFn] | None = None,
        dataset_name: str | None = None,
        dataset_split: str | None = None,
    ) -> None:
        if len(prompts) != len(references):
            raise ValueError(
                f"Got {len(prompts)} prompts but {len(references)} references; pass one per prompt."
            )
        if not prompts:
            raise ValueError("RougeLCallback needs at least one evaluation prompt.")
        if (evaluate_teacher or divergences) and getattr(trainer, "teacher_model", None) is None:
            raise ValueError(
                "evaluate_teacher / divergences need a trainer with a `teacher_model` (e.g. "
                "ABKDTrainer)."
            )
        self.trainer = trainer
        self.prompts = list(prompts)
        self.references = list(references)
        self.generation_kwargs = {
            "seeds": tuple(seeds),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "batch_size": batch_size,
        }
        self.evaluate_at_train_boundaries = evaluate_at_train_boundaries
        self.evaluate_teacher = evaluate_teacher
        self.divergences = dict(divergences or {})
        self.dataset_name = dataset_name
        self.dataset_split = dataset_split
        self.results: dict[str, RougeLResult] = {}
        self.divergence_results: dict[str, dict[str, float]] = {}
        self.history: list[dict[str, float]] = []

    def _rouge_l(self, model: torch.nn.Module) -> RougeLResult:
        # Sampling re-seeds the global RNGs; restore them so that evaluating leaves the rest of
        # training (data order, dropout) exactly as it would have been.
        with _preserved_rng_state():
            return rouge_l_evaluate(
                model,
                self.trainer.processing_class,
                self.prompts,
                self.references,
                accelerator=self.trainer.accelerator,
                **self.generation_kwargs,
            )

    def _divergence(self) -> dict[str, float]:
        return teacher_divergence(
            self.trainer.model_wrapped,
            self.trainer.teacher_model,
            self.trainer.processing_class,
            self.prompts,
            [ref if isinstance(ref, str) else ref[0] for ref in self.references],
            self.divergences,
            batch_size=self.generation_kwargs["batch_size"],
            accelerator=self.trainer.accelerator,
        )

    def _record(self, name: str, state: Any) -> None:
        result = self._rouge_l(self.trainer.model_wrapped)
        self.results[name] = result
        self.history.append({"step": state.global_step, "rouge_l": result.rouge_l})
        if self.divergences:
            self.divergence_results[name] = self._divergence()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluate_teacher and "teacher" not in self.results:
            self.results["teacher"] = self._rouge_l(self.trainer.teacher_model)
        if self.evaluate_at_train_boundaries:
            self._record("student_before", state)
            self.trainer.log({"eval_rouge_l": self.results["student_before"].rouge_l})

    def on_train_end(self, args, state, control, **kwargs):
        if self.evaluate_at_train_boundaries:
            self._record("student_after", state)
            # `Trainer.log` after training would append past the final summary; record only.

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        result = self._rouge_l(self.trainer.model_wrapped)
        self.history.append({"step": state.global_step, "rouge_l": result.rouge_l})
        # Trainer picks the best checkpoint from this same dict once the callbacks have run.
        if metrics is not None:
            metrics["eval_rouge_l"] = result.rouge_l
        self.trainer.log({"eval_rouge_l": result.rouge_l})
