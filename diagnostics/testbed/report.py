"""The testbed's report: accuracies, vocabulary, response lengths, the C spread among high-D positions and the
probability mass outside the task's tokens, measured on a freshly built pair (`diagnostics.testbed.build`)."""

from __future__ import annotations

from pathlib import Path

import torch

from diagnostics.accuracy import exact_match_accuracy
from diagnostics.lm.forward import iter_response_logits
from diagnostics.lm.models import load_model, load_pair
from diagnostics.signals import token_signals
from diagnostics.testbed.config import TestbedConfig, heldout_problems, task_token_ids

# What the default pair exists for (docs/testbed.md): a teacher that writes the trace, an under-trained student with
# room to learn whose own samples are sometimes right, responses long enough that 5% keeps >= 2 tokens, and learnable
# beside incompatible disagreement among the high-D positions. (report key, lowest allowed, highest allowed)
DEFAULT_CRITERIA = (
    ("teacher_acc_greedy", 0.95, 1.0),
    ("student_acc_greedy", 0.10, 0.50),
    ("student_acc_sampled", 0.05, 1.0),
    ("capacity_acc_greedy", 0.80, 1.0),
    ("response_tokens_median", 48, float("inf")),
    ("c_top20d_range", 0.3, float("inf")),
)
# the shipped testbeds that promise criteria (small and sort promise no accuracies; a rebuild is held to their shapes)
CRITERIA = {"default": DEFAULT_CRITERIA}


def criteria_failures(report: dict, criteria: tuple[tuple[str, float, float], ...] = DEFAULT_CRITERIA) -> list[str]:
    """The criteria a testbed's report misses, one line each (`[]`: all met); a missing measure is a miss."""
    failures = []
    for key, low, high in criteria:
        value = report.get(key)
        if value is None or not low <= value <= high:
            bound = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
            failures.append(f"{key} = {value} (must be {bound})")
    return failures

def measure_testbed(student_path: Path, teacher_path: Path, config: TestbedConfig) -> dict:
    """Accuracies, vocabulary size, response length and the C spread among high-D positions."""

    pair = load_pair(str(student_path), str(teacher_path), device="cpu", dtype="float32")
    problems = heldout_problems(config, config.eval_problems)
    acc = {}
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        for mode in ("greedy", "sampled"):
            acc[f"{role}_acc_{mode}"] = exact_match_accuracy(
                model, pair.tokenizer, problems, max_new_tokens=config.max_new_tokens, greedy=mode == "greedy",
                seed=config.seed,
            )
    spread = support_spread(pair, config)
    capacity = student_path.parent / "student_capacity"
    if capacity.is_dir():  # the same student trained to capacity_steps: shows it has room to learn

        long_student = load_model(str(capacity), torch.device("cpu"), torch.float32)
        acc["capacity_acc_greedy"] = exact_match_accuracy(
            long_student, pair.tokenizer, problems, max_new_tokens=config.max_new_tokens, greedy=True, seed=config.seed
        )
    return {
        **acc,
        "vocab_size": pair.vocab_size,
        "bpe_tokens": len(pair.tokenizer.get_vocab()) - len(pair.tokenizer.get_added_vocab()),
        "added_tokens": len(pair.tokenizer.get_added_vocab()),
        "student_vocab_rows": pair.student.config.vocab_size,
        "teacher_vocab_rows": pair.teacher.config.vocab_size,
        "response_tokens": config.max_new_tokens,
        "k": config.k,
        **spread,
    }


@torch.no_grad()
def support_spread(pair, config: TestbedConfig, top_fraction: float = 0.2) -> dict:
    """On the student's own samples (temperature 1): their lengths, and the spread of C among the
    top-20% D positions.

    Both kinds of disagreement must occur side by side: learnable (high D, high C) and incompatible
    (high D, low C). Reports the 10%/90% quantiles of C over those positions and their range.
    """

    tokenizer = pair.tokenizer
    problems = heldout_problems(config, config.spread_problems, split_seed=1)
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    ids = torch.tensor(prompts)  # [B, P]: testbed prompts all have the same length
    torch.manual_seed(config.seed)
    out = pair.student.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    prompt_len = ids.shape[1]
    response = out[:, prompt_len:]
    # valid positions: up to and including the first EOS
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    valid = ~after_eos
    lengths = valid.sum(dim=1)  # [B] tokens per sampled response, EOS included
    responses = [row[:n].tolist() for row, n in zip(response, lengths.tolist())]
    task_ids = torch.tensor(task_token_ids(config, tokenizer))
    parts: dict[str, list[torch.Tensor]] = {"d": [], "c": [], "off_s": [], "off_t": []}
    # logits of a chunk of positions at a time: [B, T, V] would be 7 GB at Qwen2's vocabulary
    for chunk in iter_response_logits([pair.student, pair.teacher], prompts, responses, vocab_size=pair.vocab_size):
        sig = token_signals(chunk.logits[0], chunk.logits[1], k=config.k)
        parts["d"].append(sig["disagreement"])
        parts["c"].append(sig["compat_mass"])
        for key, logits in (("off_s", chunk.logits[0]), ("off_t", chunk.logits[1])):
            inside = torch.logsumexp(torch.log_softmax(logits, dim=-1)[:, task_ids], dim=-1)
            parts[key].append(-torch.expm1(inside))  # [n] mass outside the task's tokens
    d, c = torch.cat(parts["d"]), torch.cat(parts["c"])
    lengths = lengths.float()
    top = d >= torch.quantile(d, 1 - top_fraction)
    c_top = c[top]
    q10, q90 = torch.quantile(c_top, 0.1).item(), torch.quantile(c_top, 0.9).item()
    return {
        "response_tokens_q10": torch.quantile(lengths, 0.1).item(),  # the student's own samples at T = 1
        "response_tokens_median": torch.quantile(lengths, 0.5).item(),
        "response_tokens_q90": torch.quantile(lengths, 0.9).item(),
        "spread_positions": int(valid.sum()),
        "c_top20d_q10": round(q10, 4),
        "c_top20d_q90": round(q90, 4),
        "c_top20d_range": round(q90 - q10, 4),
        "c_all_q10": round(torch.quantile(c, 0.1).item(), 4),
        # probability the models put outside the task's tokens on these samples (the Qwen2 vocabulary: 151k others)
        "off_task_mass_student": float(torch.cat(parts["off_s"]).mean()),
        "off_task_mass_teacher": float(torch.cat(parts["off_t"]).mean()),
    }
