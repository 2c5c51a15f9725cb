"""Offline factories for tests: a byte-level tokenizer, tiny causal LMs and toy datasets.

Nothing here touches the network. The tokenizer is built in code (256 byte tokens plus a few
special tokens), so any text round-trips through ``encode``/``decode``; the models are random
initialisations of real architectures built from their configs.

Names in this module are imported by the tests of several sub-packages: keep them stable.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SUPPORTED_ARCHS: tuple[str, ...] = ("qwen2", "llama", "gpt2")
# Positions of the tiny models: SFTConfig's default `max_length` (1024), which ABKDTrainer checks
# against every model's position limit.
TINY_POSITION_LIMIT = 1024

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
ENDOFTEXT = "<|endoftext|>"

# A ChatML template (as used by Qwen2) whose assistant turns, end-of-turn token included, sit inside
# {% generation %} markers so that `assistant_only_loss=True` can build an assistant mask from it.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Deliberately short sentences: byte-level tokenisation makes one token per character.
_PROMPTS = (
    "Name a colour.",
    "What is two plus two?",
    "Say hello.",
    "Give an animal.",
    "Pick a number.",
    "Name a fruit, please.",
    "What day is it?",
    "Spell cat.",
)
_COMPLETIONS = (
    " Blue.",
    " Four.",
    " Hello there!",
    " A small grey cat.",
    " Seven.",
    " A ripe apple.",
    " Monday.",
    " C A T.",
)


def build_tiny_tokenizer(*, extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer with no merges (one token per byte) and ChatML specials.

    Vocabulary: the 256 byte symbols, then the special tokens ``<|im_end|>``, ``<|pad|>``,
    ``<|endoftext|>``, ``<|im_start|>`` and ``extra_special_tokens`` (260 entries by default).
    ``eos`` is ``<|im_end|>`` (what a chat model emits at the end of a turn), ``pad`` ``<|pad|>``.
    ``extra_special_tokens`` gives a tokenizer with a different vocabulary, for mismatch tests.
    The chat template is :data:`CHATML_TEMPLATE`, which has ``{% generation %}`` markers.
    """
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[ENDOFTEXT, IM_START, *extra_special_tokens],
    )
    # Tests rely on ids being dense: every id is below len(tokenizer).
    if max(tokenizer.get_vocab().values()) != len(tokenizer) - 1:
        raise RuntimeError("tiny tokenizer ids are not contiguous; a duplicate special token?")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def _tiny_config(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    initializer_range: float,
) -> PretrainedConfig:
    special_ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    num_heads = 4 if hidden_size % 4 == 0 else 1
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=TINY_POSITION_LIMIT,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            initializer_range=initializer_range,
            **special_ids,
        )
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        # Grouped-query attention, as in the real checkpoints, when the head count allows it.
        "num_key_value_heads": max(1, num_heads // 2),
        "max_position_embeddings": TINY_POSITION_LIMIT,
        "initializer_range": initializer_range,
        **special_ids,
    }
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def build_tiny_causal_lm(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    seed: int,
    vocab_size: int | None = None,
    initializer_range: float = 0.02,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM of architecture ``arch`` ("qwen2", "llama", "gpt2").

    ``vocab_size`` defaults to ``len(tokenizer)``; a larger value gives an embedding matrix padded
    with rows no token maps to (like Qwen2.5-7B's 152064 rows for a 151665-entry tokenizer).
    The same ``seed`` gives the same weights; weights are fp32 and attention uses SDPA. A larger
    ``initializer_range`` than the usual 0.02 gives a random model peaked next-token distributions
    (useful for a teacher whose top-1 choice should mean something).
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {SUPPORTED_ARCHS}.")
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} entries); "
            "pass vocab_size >= len(tokenizer) or None."
        )
    config = _tiny_config(arch, tokenizer, hidden_size, num_layers, vocab_size, initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_text_dataset(num_examples: int = 8) -> Dataset:
    """A language-modelling dataset: one ``text`` column of prompt + completion sentences."""
    rows = [
        _PROMPTS[i % len(_PROMPTS)] + _COMPLETIONS[i % len(_COMPLETIONS)]
        for i in range(num_examples)
    ]
    return Dataset.from_dict({"text": rows})


def build_prompt_completion_dataset(num_examples: int = 8) -> Dataset:
    """A standard prompt-completion dataset (``prompt`` and ``completion`` string columns)."""
    return Dataset.from_dict(
        {
            "prompt": [_PROMPTS[i % len(_PROMPTS)] for i in range(num_examples)],
            "completion": [_COMPLETIONS[i % len(_COMPLETIONS)] for i in range(num_examples)],
        }
    )


def build_conversational_dataset(num_examples: int = 8) -> Dataset:
    """A conversational dataset: a ``messages`` column of system/user/assistant turns."""
    conversations: list[list[dict[str, Any]]] = []
    for i in range(num_examples):
        conversations.append(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": _PROMPTS[i % len(_PROMPTS)]},
                {"role": "assistant", "content": _COMPLETIONS[i % len(_COMPLETIONS)].strip()},
            ]
        )
    return Dataset.from_dict({"messages": conversations})


def build_conversational_prompt_completion_dataset(num_examples: int = 8) -> Dataset:
    """A conversational prompt-completion dataset: ``prompt`` and ``completion`` message lists."""
    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": _PROMPTS[i % len(_PROMPTS)]}]
                for i in range(num_examples)
            ],
            "completion": [
                [{"role": "assistant", "content": _COMPLETIONS[i % len(_COMPLETIONS)].strip()}]
                for i in range(num_examples)
            ],
        }
    )


def cpu_training_kwargs() -> dict[str, Any]:
    """Training-argument overrides every CPU test needs (SFTConfig defaults to bf16, reporting)."""
    return {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
    }


# ---------------------------------------------------------------------------------------------
# Distillation set-ups and an independent reference for the trainer's loss
# ---------------------------------------------------------------------------------------------

STUDENT_HIDDEN, STUDENT_LAYERS = 32, 1
TEACHER_HIDDEN, TEACHER_LAYERS = 64, 2
# Random teachers with the usual 0.02 init are near-uniform; 0.3 gives peaked distributions
# (entropy ~3.2 nats of 5.56), so top-1 agreement and the divergence carry signal.
TEACHER_INIT_RANGE = 0.3


def build_student_and_teacher(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A tiny student and a wider, deeper, peaked teacher of the same architecture."""
    student = build_tiny_causal_lm(
        arch,
        tokenizer,
        hidden_size=STUDENT_HIDDEN,
        num_layers=STUDENT_LAYERS,
        seed=0,
        vocab_size=student_vocab_size,
    )
    teacher = build_tiny_causal_lm(
        arch,
        tokenizer,
        hidden_size=TEACHER_HIDDEN,
        num_layers=TEACHER_LAYERS,
        seed=1,
        vocab_size=teacher_vocab_size,
        initializer_range=TEACHER_INIT_RANGE,
    )
    return student, teacher


def build_abkd_trainer(
    output_dir: Any,
    *,
    arch: str = "qwen2",
    tokenizer: PreTrainedTokenizerFast | None = None,
    student: Any = None,
    teacher: Any = None,
    train_dataset: Dataset | None = None,
    eval_dataset: Dataset | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Any:
    """An ``ABKDTrainer`` on tiny models with CPU-safe arguments; every piece can be overridden."""
    from abkd_trainer import ABKDConfig, ABKDTrainer

    tokenizer = tokenizer or build_tiny_tokenizer()
    if student is None or teacher is None:
        default_student, default_teacher = build_student_and_teacher(arch, tokenizer)
        student = default_student if student is None else student
        teacher = default_teacher if teacher is None else teacher
    config = {
        **cpu_training_kwargs(),
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        **config_overrides,
    }
    return ABKDTrainer(
        model=student,
        teacher_model=teacher,
        args=ABKDConfig(**config),
        train_dataset=build_prompt_completion_dataset() if train_dataset is None else train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )


def reference_token_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    divergence: str,
    *,
    alpha: float = 0.2,
    beta: float = 0.7,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence straight from the textbook formulas, in float64.

    ``(..., V)`` logits -> ``(...)``. Supports ``"ab"`` (alpha, beta, alpha + beta all non-zero)
    and ``"fkl"``. Deliberately naive (probabilities and ``pow``): an independent check of the
    library's log-space kernels, usable only at the tiny sizes of these tests.
    """
    p = (teacher_logits.double() / temperature).softmax(-1)
    q = (student_logits.double() / temperature).softmax(-1)
    if divergence == "fkl":
        return (p * (p.log() - q.log())).sum(-1)
    if divergence == "ab":
        a, b = alpha, beta
        terms = p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)
        return -terms.sum(-1) / (a * b)
    raise ValueError(f"no reference for divergence {divergence!r}")


@torch.no_grad()
def reference_distillation_sums(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    supervised_targets: Sequence[Sequence[bool]],
    vocab_size: int,
    divergence: str = "ab",
    **divergence_params: float,
) -> dict[str, float]:
    """Sums over supervised next-token predictions, each sequence run on its own (no padding).

    ``supervised_targets[i][j]`` says whether token ``j`` of sequence ``i`` is a target, i.e.
    whether the prediction made at position ``j - 1`` counts. Logits are cut to ``vocab_size``.
    Returns ``{"kd": sum of divergences, "ce": sum of cross-entropies, "agree": top-1 matches,
    "student_entropy" / "teacher_entropy": sums of -sum_k p_k log p_k (temperature 1),
    "correct": student top-1 == target, "count": supervised tokens}``.
    """
    sums = dict.fromkeys(
        ("kd", "ce", "agree", "student_entropy", "teacher_entropy", "correct", "count"), 0.0
    )
    # Deterministic forwards (no dropout), leaving the models in the mode they came in.
    modes = [(model, model.training) for model in (student, teacher)]
    student.eval()
    teacher.eval()
    for token_ids, targets in zip(sequences, supervised_targets, strict=True):
        input_ids = torch.tensor([list(token_ids)])
        student_logits = student(input_ids=input_ids).logits[0, :-1, :vocab_size].double()
        teacher_logits = teacher(input_ids=input_ids).logits[0, :-1, :vocab_size].double()
        counted = torch.tensor(list(targets)[1:], dtype=torch.bool)
        next_tokens = input_ids[0, 1:]
        kd = reference_token_divergence(
            teacher_logits, student_logits, divergence, **divergence_params
        )
        ce = -student_logits.log_softmax(-1).gather(-1, next_tokens[:, None]).squeeze(-1)
        agree = student_logits.argmax(-1) == teacher_logits.argmax(-1)
        correct = student_logits.argmax(-1) == next_tokens
        for who, logits in (("student", student_logits), ("teacher", teacher_logits)):
            probs = logits.softmax(-1)
            entropy = -(probs * probs.log()).sum(-1)  # textbook form; no zero probabilities here
            sums[f"{who}_entropy"] += entropy[counted].sum().item()
        sums["correct"] += correct[counted].sum().item()
        sums["kd"] += kd[counted].sum().item()
        sums["ce"] += ce[counted].sum().item()
        sums["agree"] += agree[counted].sum().item()
        sums["count"] += counted.sum().item()
    for model, was_training in modes:
        model.train(was_training)
    return sums


# ----------------------------------------------------------------------------- Hub HTTP handlers
# For the `hub_http` fixture (conftest.py): functions from an httpx request to a response.


def hub_no_network(request: Any) -> Any:
    """No network: every request fails as a DNS lookup without a network does."""
    import httpx2

    raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)


def hub_whoami(role: str = "write", *, create_repo: bool = False) -> Any:
    """A Hub that answers ``whoami`` (a token with ``role``) and, optionally, ``create_repo``;
    every other request (the upload) fails like :func:`hub_no_network`."""
    import httpx2

    def handler(request: Any) -> Any:
        if request.url.path == "/api/whoami-v2":
            return httpx2.Response(
                200, json={"name": "tester", "auth": {"accessToken": {"role": role}}}
            )
        if create_repo and request.url.path == "/api/repos/create":
            name = json.loads(request.content)["name"]
            organization = json.loads(request.content).get("organization") or "tester"
            return httpx2.Response(
                200, json={"url": f"https://huggingface.co/{organization}/{name}"}
            )
        return hub_no_network(request)

    return handler


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """Import a script of the repository (``benchmarks/x.py``, ``scripts/y.py``) as a module.

    Registered in ``sys.modules`` under ``module_name``: dataclasses resolve their annotations
    through it.
    """
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def docstring_field_entries(cls: type) -> dict[str, str]:
    """`name -> entry text` (its lines joined) of every field entry in a config's docstring
    groups (`Parameters: <title>` sections, entries indented 4, continuations 8)."""
    entries: dict[str, str] = {}
    name = None
    for line in inspect.getdoc(cls).splitlines():
        if match := re.match(r"^    (\w+): (.*)$", line):
            name = match.group(1)
            entries[name] = match.group(2)
        elif name and line.startswith("        "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries
