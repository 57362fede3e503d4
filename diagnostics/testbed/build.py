"""The embedded testbed: a tiny Qwen2 teacher and student trained from scratch on a verifiable task.

On a machine with no GPU and no model downloads, every command runs on this pair. Both are standard
Hugging Face checkpoints (config.json, model.safetensors, tokenizer.json), so every code path, vLLM
included, loads them exactly as it loads real Qwen models.

- Task (`task: trace`, the default): `sort w1 .. w8 :` -> the selection-sort trace, 51 tokens with
  EOS (`diagnostics.testbed.task.selection_trace`): most tokens copy the previous step's list, a minority
  are decisions (each step's minimum, the word to skip). `task: sort` writes the sorted list only
  (9 tokens; configs/testbed_sort.yaml, the first testbed).
- Tokenizer: a Qwen2 byte-level BPE (Qwen's pre-tokenizer, vocab and merges in tokenizer.json)
  whose merges make each task word and symbol one token; `AutoTokenizer` loads it as
  `Qwen2Tokenizer`, the class it forces for every qwen2 checkpoint, as for real Qwen models.
- `vocabulary: qwen2` (configs/testbed_qwen_vocab.yaml): the same task written with the real Qwen2 tokenizer
  (`diagnostics.testbed.qwen_vocab`: 151,643 ranks + 22 added tokens; task words = those that are one Qwen2 token)
  and LM heads of `vocab_rows` = 151,936; the models learn the task on its own tokens, are expanded to the
  full vocabulary and calibrated with the full softmax (`calibrate_checkpoint`).
- Teacher: trained until it writes the trace almost perfectly. Student: the same family, smaller,
  and UNDER-TRAINED: the snapshot after `student.train_steps` of a supervised run that continues to
  `capacity_steps`; the report gives that continued student's accuracy (the capacity check: the
  student can learn the task, so on-policy distillation has something to teach), and its own
  samples at temperature 1 are sometimes right, so on-policy rollouts carry signal. The teacher's
  LM head is padded to a multiple of 64 rows, as Qwen pads its models, so the padding path runs.
- Default top-K of the pair: the config's `k` (trace: 4, chosen by the spread of C among the
  highest-disagreement positions; see configs/testbed.yaml).

The default, small and sorting pairs ship inside the package (`diagnostics/testbed/shipped/`, `manifest`): a
config whose hash is one of theirs loads the shipped files, each checked against its sha256. Any other config is
built once and cached under `cache_dir/<hash of the config>`; the second call reuses it in seconds. Builds are
written to a temporary directory and renamed, so a killed build leaves nothing half-done.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from diagnostics.core.config import config_to_dict
from diagnostics.core.files import read_json, share_tree
from diagnostics.data.problems import Problem
from diagnostics.testbed.config import (
    CALIBRATION_SEED_OFFSET,
    CHAT_TEMPLATE,
    TRAIN_SEED_OFFSET,
    ModelSpec,
    TestbedConfig,
    qwen2_tokenizer,
    task_token_ids,
)
from diagnostics.testbed.manifest import find_shipped
from diagnostics.testbed.qwen_vocab import (
    calibrate_rows,
    expand_vocabulary,
    row_lookup,
)
from diagnostics.testbed.report import measure_testbed
from diagnostics.testbed.task import CHAT_TOKENS, EOS_TOKEN, PAD_TOKEN, task_words


def make_tokenizer(config: TestbedConfig) -> Qwen2Tokenizer:
    """The testbed's tokenizer; with the Qwen2 vocabulary, checked to write each task word and symbol as one token."""
    if config.vocabulary == "task":
        return build_tokenizer(config.n_words, config.task_spec.symbols)
    tokenizer = copy.deepcopy(qwen2_tokenizer())
    pieces = ["sort", " :", *(" " + s for s in config.task_spec.symbols)]
    split = [p for p in pieces if len(tokenizer(p, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(f"vocabulary: {split} are not single tokens of the Qwen2 vocabulary")
    return tokenizer


def build_tokenizer(n_words: int, symbols: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer in which `sort`, ` :`, every ` word` and every ` symbol` are
    single tokens.

    Vocabulary: special tokens, the byte-level characters used, then each merge result. Merges are
    left-to-right chains (`Ġ`+`a` -> `Ġa`, `Ġa`+`b` -> `Ġab`), so every word merges completely and
    no two chains compete. Intermediate pieces (`Ġa`) are tokens too, as in any real BPE.
    """
    space = "\u0120"  # byte-level BPE's visible space, `Ġ`
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token in (EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS, space, ":", *string.ascii_lowercase, *symbols):
        vocab.setdefault(token, len(vocab))
    words = ([space, *word] for word in task_words(n_words))
    for pieces in (list("sort"), [space, ":"], *words, *([space, symbol] for symbol in symbols)):
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_problem(tokenizer: PreTrainedTokenizerBase, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids including EOS)."""
    prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    # the answer continues the prompt, so its first word carries the leading space
    response = tokenizer(" " + problem.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def vocab_rows_of(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> int:
    """LM-head rows of a model: `vocab_rows`, or the tokenizer's length rounded up to `vocab_multiple`."""
    rows = spec.vocab_rows or math.ceil(len(tokenizer) / spec.vocab_multiple) * spec.vocab_multiple
    if rows < len(tokenizer):
        raise ValueError(f"vocab_rows: {rows} LM-head rows for a tokenizer of {len(tokenizer)} tokens")
    return rows


def make_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, n_positions: int, seed: int,
               rows: int | None = None) -> Qwen2ForCausalLM:
    """A fresh seeded Qwen2 of `spec`; `rows` vocabulary rows (default `vocab_rows_of`)."""
    rows = vocab_rows_of(spec, tokenizer) if rows is None else rows
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max(64, 2 * n_positions),
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=None,
        # a task-vocabulary model (rows < the tokenizer) numbers its tokens 0..rows-1: no special ids there
        eos_token_id=tokenizer.eos_token_id if rows >= len(tokenizer) else None,
        pad_token_id=tokenizer.pad_token_id if rows >= len(tokenizer) else None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def train_on_task(
    model: Qwen2ForCausalLM,
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    config: TestbedConfig,
    seed: int,
    desc: str,
    *,
    steps: int | None = None,
    snapshot: Callable[[int, Qwen2ForCausalLM], None] | None = None,
    vocab_ids: torch.Tensor | None = None,
) -> Qwen2ForCausalLM:
    """Supervised training on fresh problems each step; loss on response tokens only.

    `vocab_ids` [n] (sorted token ids): `model` has n vocabulary rows, row j for token vocab_ids[j]
    (`diagnostics.testbed.qwen_vocab.expand_vocabulary` makes the full model of it afterwards).

    The schedule (linear warmup, cosine decay to 10%) spans `steps` (default `spec.train_steps`);
    `snapshot(step, model)` is called after every step, so one run can save an early checkpoint.
    """
    steps = spec.train_steps if steps is None else steps
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    problems = config.problems(steps * spec.batch_size, seed)
    lookup = None if vocab_ids is None else row_lookup(vocab_ids, len(tokenizer))
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        batch = [encode_problem(tokenizer, p) for p in problems[step * spec.batch_size : (step + 1) * spec.batch_size]]
        ids = torch.tensor([prompt + response for prompt, response in batch])  # [B, L]: all the same length
        if lookup is not None:
            ids = lookup[ids]  # token ids -> rows of the task-vocabulary model
        labels = ids.clone()
        labels[:, : len(batch[0][0])] = -100  # no loss on the prompt
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if snapshot is not None:
            snapshot(step + 1, model)
    return model.eval()


@dataclass
class Testbed:
    """Paths of a testbed, its measured report, and where it came from."""

    root: Path
    config: TestbedConfig
    report: dict
    source: str = "cache"  # shipped (inside the package, sha256-checked) | cache (built earlier) | built (just now)
    shipped_name: str = ""  # the shipped testbed's name (default, small, sort)

    def describe(self) -> str:
        """One line: which testbed this is (shipped or built) and its config hash."""
        key = self.config.cache_key()
        if self.source == "shipped":
            return f"shipped testbed '{self.shipped_name}' (config hash {key}; every file's sha256 checked)"
        return f"{'built now' if self.source == 'built' else 'cached build'} (config hash {key}) in {self.root}"

    @property
    def teacher_path(self) -> str:
        return str(self.root / "teacher")

    @property
    def student_path(self) -> str:
        return str(self.root / "student")


def save_checkpoint(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    share_tree(out)  # save_pretrained writes model.safetensors 0600: the cache follows the umask like any result


def build_testbed(config: TestbedConfig, *, force: bool = False, progress: bool = True,
                  use_shipped: bool = True) -> Testbed:
    """The shipped testbed of `config`'s hash (files checked; `use_shipped`), else build (or reuse from the cache)
    the tokenizer, teacher and student and measure the report; `force` rebuilds the cached one.

    Builds run on one torch thread: the weights then do not depend on the machine's core count (a
    matmul's reduction order changes with it), and one thread is also the fastest for these small
    matrices on a shared 2-core machine.
    """
    shipped = find_shipped(config) if use_shipped and not force else None  # a damaged file is an error here
    if shipped is not None:
        name, root = shipped
        return Testbed(root, config, read_json(root / "report.json", "the testbed's report"), "shipped", name)
    root = config.cache_root() / config.cache_key()
    report_path = root / "report.json"
    if report_path.is_file() and not force:
        return Testbed(root, config, read_json(report_path, "the testbed's report"))
    # a private temporary directory, renamed into place at the end: a killed build leaves no
    # half-written testbed, and two concurrent builds cannot mix files
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = _build_into(tmp, config)
    except BaseException:  # a failed or interrupted build leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    if force:
        shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:  # another process finished the same build first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return Testbed(root, config, read_json(report_path, "the testbed's report"))
    return Testbed(root, config, report, "built")


def _build_into(tmp: Path, config: TestbedConfig) -> dict:
    """Train the teacher and the student into `tmp`, measure them, write report.json; the report."""
    started = time.perf_counter()
    tokenizer = make_tokenizer(config)
    n_positions = config.n_items + 2 + config.max_new_tokens  # `sort`, the words, ` :`, the response
    durations = {}
    # the Qwen2 vocabulary: the task is learned with the softmax over its own tokens (diagnostics.testbed.qwen_vocab)
    vocab_ids = torch.tensor(task_token_ids(config, tokenizer)) if config.vocabulary != "task" else None
    for role in ("teacher", "student"):
        spec: ModelSpec = getattr(config, role)
        seed = config.seed + TRAIN_SEED_OFFSET[role]
        t0 = time.perf_counter()
        model = make_model(spec, tokenizer, n_positions, seed, rows=None if vocab_ids is None else len(vocab_ids))

        def save(model: Qwen2ForCausalLM, out: Path, spec: ModelSpec = spec, seed: int = seed) -> None:
            if vocab_ids is not None:  # the task-vocabulary model at its full vocabulary
                model = expand_vocabulary(model, vocab_ids, vocab_rows_of(spec, tokenizer), seed,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            save_checkpoint(model, tokenizer, out)

        if role == "student" and config.capacity_steps:
            # one run to capacity_steps; the student is its snapshot at student.train_steps
            def save_student(step: int, model: Qwen2ForCausalLM) -> None:
                if step == spec.train_steps:
                    save(model.eval(), tmp / "student")
                    model.train()

            train_on_task(
                model, spec, tokenizer, config, seed, "training student",
                steps=config.capacity_steps, snapshot=save_student, vocab_ids=vocab_ids,
            )
            save(model, tmp / "student_capacity")
        else:
            train_on_task(model, spec, tokenizer, config, seed, desc=f"training {role}", vocab_ids=vocab_ids)
            save(model, tmp / role)
        durations[f"{role}_train_s"] = round(time.perf_counter() - t0, 1)
    if vocab_ids is not None and config.calibration_steps:
        t0 = time.perf_counter()
        for name in ("teacher", "student", "student_capacity"):
            if (tmp / name).is_dir():
                calibrate_checkpoint(tmp / name, tokenizer, config, vocab_ids)
        durations["calibration_s"] = round(time.perf_counter() - t0, 1)

    report = measure_testbed(tmp / "student", tmp / "teacher", config)
    report.update(durations, build_s=round(time.perf_counter() - started, 1), cache_key=config.cache_key())
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    (tmp / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    return report


def calibrate_checkpoint(path: Path, tokenizer: PreTrainedTokenizerBase, config: TestbedConfig,
                         vocab_ids: torch.Tensor) -> None:
    """`calibrate_rows` on a saved checkpoint (the rows outside the task's tokens, full softmax), saved back."""
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    size = config.calibration_batch_size
    problems = config.problems(config.calibration_steps * size, config.seed + CALIBRATION_SEED_OFFSET)
    batches = []
    for start in range(0, len(problems), size):
        encoded = [encode_problem(tokenizer, p) for p in problems[start : start + size]]
        batches.append((torch.tensor([prompt + response for prompt, response in encoded]), len(encoded[0][0])))
    # the offset alone first: starting the body on the expanded model's random rows disturbs the task (teacher
    # greedy 54% -> 10% measured); then, with the other tokens already low, the body and the task's rows too
    calibrate_rows(model, batches, vocab_ids, config.calibration_lr)
    if config.calibration_body_lr > 0:
        calibrate_rows(model, batches, vocab_ids, config.calibration_lr, body_lr=config.calibration_body_lr)
    save_checkpoint(model, tokenizer, path)
