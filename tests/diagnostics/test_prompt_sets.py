"""Prompt sets through `datasets` (offline: local fixture files), rendering, and the release's held-out shard."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from diagnostics.data.prompt_sets import (
    PromptSetError,
    build_heldout_shard,
    dapo_slime_records,
    heldout_shard_indices,
    load_prompt_set,
    render_chat,
    render_problems,
)

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
EXPECTED = [("What is 3 + 4?", "7"), ("What is 2^10?", "1024"), ("What is 1 divided by 2?", "\\frac{1}{2}")]
# The generation-prompt part of Qwen3's chat template (its `enable_thinking` switch).
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.mark.parametrize("name, columns", [
    ("prompts.jsonl", {}),
    ("prompts.json", {"prompt_column": "question", "answer_column": "solution"}),
    ("prompts.parquet", {"prompt_column": "problem", "answer_column": "reward_model.ground_truth"}),
])
def test_each_file_format_loads_with_a_column_mapping(name, columns):
    problems = load_prompt_set(DATA / name, **columns)
    assert [(p.prompt, p.answer) for p in problems] == EXPECTED  # JSONL: blank line skipped, number -> text
    assert [p.prompt_id for p in problems] == [0, 1, 2]


def test_message_list_prompts_and_nested_answers():
    problems = load_prompt_set(DATA / "messages.jsonl", answer_column="reward_model.ground_truth")
    assert problems[0].prompt == ({"role": "user", "content": "What is 3 + 4?"},)
    assert [m["role"] for m in problems[1].prompt] == ["system", "user"]
    assert [p.answer for p in problems] == ["7", "1024"]
    # a dotted path reaches into the message list too
    flat = load_prompt_set(DATA / "messages.jsonl", prompt_column="prompt.0.content",
                           answer_column="reward_model.ground_truth")
    assert flat[0].prompt == "What is 3 + 4?"


def test_malformed_json_names_file_and_line():
    with pytest.raises(PromptSetError, match=r"bad_json\.jsonl: line 3: invalid JSON"):
        load_prompt_set(DATA / "bad_json.jsonl")


def test_malformed_record_names_file_row_and_line():
    with pytest.raises(PromptSetError, match=r"bad_record\.jsonl: row 2 \(line 3\): the prompt is empty"):
        load_prompt_set(DATA / "bad_record.jsonl")


def test_missing_column_names_the_columns_present():
    with pytest.raises(PromptSetError, match=r"prompts\.json: row 1: no 'answer'.*columns: question, solution"):
        load_prompt_set(DATA / "prompts.json", prompt_column="question")
    loose = load_prompt_set(DATA / "prompts.json", prompt_column="question", require_answer=False)
    assert [p.answer for p in loose] == ["", "", ""]


def test_bad_message_list_and_missing_file(tmp_path):
    path = tmp_path / "roles.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"}) + "\n")
    with pytest.raises(PromptSetError, match=r"roles\.jsonl: row 1 \(line 1\): message 0: unknown role 'robot'"):
        load_prompt_set(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_set(tmp_path / "missing.jsonl")
    other = tmp_path / "prompts.csv"
    other.write_text("prompt,answer\n")
    with pytest.raises(PromptSetError, match="unsupported prompt file type '.csv'"):
        load_prompt_set(other)


@pytest.fixture
def tokenizer():
    """A word-level tokenizer built in memory (rendering only needs its chat template)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")


def test_render_chat_thinking_switch(tokenizer):
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    default = render_chat(tokenizer, "What is 3 + 4?")
    assert default == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    off = render_chat(tokenizer, "What is 3 + 4?", enable_thinking=False)
    assert off == default + "<think>\n\n</think>\n\n"
    assert render_chat(tokenizer, "What is 3 + 4?", enable_thinking=True) == default
    messages = load_prompt_set(DATA / "messages.jsonl", answer_column="reward_model.ground_truth")
    rendered = render_problems(tokenizer, messages, enable_thinking=False)
    assert rendered[1].prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert rendered[1].answer == "1024"
    with_system = render_chat(tokenizer, "hi", system_prompt="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_render_chat_refuses_what_it_cannot_honour(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the testbed's template
    assert render_chat(tokenizer, "sort ab :") == "sort ab :"
    with pytest.raises(ValueError, match="no enable_thinking switch"):
        render_chat(tokenizer, "sort ab :", enable_thinking=False)
    assert render_chat(tokenizer, "sort ab :", chat_template=False) == "sort ab :"
    with pytest.raises(ValueError, match="a chat message list needs"):
        render_chat(tokenizer, [{"role": "user", "content": "x"}], chat_template=False)


def release_shard_reference(rows: list[str], seed: int) -> list[str]:
    """The release's procedure written out plainly (run_4b_to_1p7b_heldout_fixed_context_300.sh)."""
    pool = list(range(len(rows) // 2, len(rows)))
    rng = random.Random(seed)
    return [rows[i] for i in sorted(rng.sample(pool, min(400, len(pool))))]


def test_heldout_shard_matches_the_release_procedure(tmp_path):
    rows = [json.dumps({"prompt": f"problem {i}", "label": str(i)}) for i in range(1001)]
    source = tmp_path / "dapo_math_17k_dedup_slime.jsonl"
    source.write_text("\n".join(rows) + "\n")
    out = tmp_path / "heldout.jsonl"
    meta = build_heldout_shard(source, out, seed=41717)
    written = out.read_text().splitlines()
    assert written == release_shard_reference(rows, 41717)
    assert len(written) == 400 and meta["pool_start"] == 500 and min(meta["indices"]) >= 500
    assert json.loads((tmp_path / "heldout.indices.json").read_text())["indices"] == meta["indices"]
    # the second release builder samples pool positions; same rows
    pool = rows[len(rows) // 2:]
    positions = sorted(random.Random(41717).sample(range(len(pool)), 400))
    assert [pool[i] for i in positions] == written
    assert len(heldout_shard_indices(10)) == 5  # a small source: the whole latter half
    # the shard loads as a prompt set with the release's columns
    assert load_prompt_set(out, answer_column="label")[0].prompt.startswith("problem ")


def test_dapo_slime_records_dedup_keeps_first():
    records = [
        {"prompt": [{"role": "user", "content": "A "}], "reward_model": {"ground_truth": "1"}},
        {"prompt": [{"role": "user", "content": "A"}], "reward_model": {"ground_truth": "2"}},
        {"prompt": [], "reward_model": {"ground_truth": "3"}},
        {"prompt": [{"role": "user", "content": "B"}], "reward_model": {"ground_truth": "4"}},
    ]
    assert dapo_slime_records(records) == [{"prompt": "A ", "label": "1"}, {"prompt": "B", "label": "4"}]


def test_hub_id_path_with_a_stubbed_hub(monkeypatch):
    """A hub id goes to datasets.load_dataset(id, name=subset, split=split); no network: the hub is stubbed."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "offline/missing":
            raise ConnectionError("no network")
        return datasets.Dataset.from_list([{"problem": "What is 3 + 4?", "answer": "7"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_prompt_set("HuggingFaceH4/MATH-500", prompt_column="problem", split="test")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")] and problems[0].answer == "7"
    with pytest.raises(PromptSetError, match=r"offline/missing: not a local file.*split 'train'.*no network"):
        load_prompt_set("offline/missing")
