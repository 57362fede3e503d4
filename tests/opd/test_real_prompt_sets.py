"""Real-model prompts through `diagnostics.data.prompt_sets` in both recipes: a parquet file with message-list
prompts and a nested answer column, read by `diagnostics.pair.heldout_problems` (diagnose) and
`opd.trainer.training_texts` / `heldout` (train), rendered with `enable_thinking`; the new keys at their
defaults leave run names alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from diagnostics.core.config import ConfigError, load_config
from diagnostics.data.prompt_sets import PromptSetError, load_problems
from diagnostics.diagnose import run_diagnose
from diagnostics.diagnose_config import DiagnoseConfig
from diagnostics.pair import BANK_SPLIT_SEED, ResolvedPair, heldout_problems
from opd.config import TrainConfig
from opd.trainer import EVAL_SPLIT_SEED, heldout, training_texts

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "Answer briefly."}
QWEN3_STYLE_TEMPLATE = (  # the generation-prompt part of Qwen3's chat template, with its enable_thinking switch
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
NO_THINK = "<think>\n\n</think>\n\n"


def write_parquet_set(path: Path, questions: list[str], *, system: bool = True) -> Path:
    """DAPO-Math-17k's layout: `prompt` a message list, the answer at reward_model.ground_truth."""
    rows = [{"prompt": ([SYSTEM] if system else []) + [{"role": "user", "content": q}],
             "reward_model": {"ground_truth": f"a{i}", "style": "rule"}, "data_source": "fixture"}
            for i, q in enumerate(questions)]
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def qwen_style_tokenizer():
    """A word-level tokenizer built in memory with Qwen3's thinking switch (rendering only)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    return tokenizer


def real_config(path: Path, *overrides: str) -> TrainConfig:
    base = ["student=s", "teacher=t", f"prompts={path}", f"eval_prompts={path}",
            "answer_column=reward_model.ground_truth", "steps=2", "batch_size=4"]
    given = {o.split("=", 1)[0] for o in overrides}  # a key given twice on the command line is an error
    return load_config(TrainConfig, ROOT / "configs/train_quick.yaml",
                       [b for b in base if b.split("=", 1)[0] not in given] + list(overrides))


def test_parquet_message_prompts_through_both_recipes(tmp_path, qwen_style_tokenizer):
    path = write_parquet_set(tmp_path / "set.parquet", [f"What is {i} + {i}?" for i in range(6)])
    pair = ResolvedPair("s", "t", 16, 256)
    first = heldout_problems(pair, 2, split_seed=0, prompts=str(path), key="prompts",
                             answer_column="reward_model.ground_truth")
    assert [p.answer for p in first] == ["a0", "a1"]
    assert first[0].prompt == (SYSTEM, {"role": "user", "content": "What is 0 + 0?"})  # the message list as given

    config = real_config(path, "enable_thinking=false")
    texts = training_texts(config, None, 0, qwen_style_tokenizer)
    assert len(texts) == 8  # steps * batch_size: a permutation of the 6 prompts, then the next epoch's first 2
    rendered = {f"<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is {i} + {i}?<|im_end|>\n"
                f"<|im_start|>assistant\n{NO_THINK}" for i in range(6)}
    assert set(texts[:6]) == rendered and set(texts[6:]) <= rendered
    evaluation = heldout(config, pair, 2, EVAL_SPLIT_SEED, qwen_style_tokenizer)
    bank = heldout(config, pair, 2, BANK_SPLIT_SEED, qwen_style_tokenizer)  # the bank: the file's last prompts
    assert [p.answer for p in evaluation] == ["a0", "a1"] and [p.answer for p in bank] == ["a4", "a5"]
    assert all(p.prompt.endswith(NO_THINK) and p.prompt in rendered for p in evaluation + bank)
    default = training_texts(real_config(path), None, 0, qwen_style_tokenizer)  # null: the template's default
    assert default == [t.removesuffix(NO_THINK) for t in texts]

    flat = real_config(path, "prompt_column=prompt.1.content")  # a dotted path into the message list
    assert training_texts(flat, None, 0, qwen_style_tokenizer)[0].startswith("<|im_start|>user\nWhat is")


def test_bad_columns_and_switches_are_clear_errors(tmp_path, qwen_style_tokenizer):
    path = write_parquet_set(tmp_path / "set.parquet", ["q0", "q1"])
    pair = ResolvedPair("s", "t", 16, 256)
    with pytest.raises(PromptSetError, match=r"set\.parquet: row 1: no 'answer'.*answer_column='answer'"):
        heldout(real_config(path, "answer_column=answer"), pair, 1, EVAL_SPLIT_SEED, qwen_style_tokenizer)
    qwen_style_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="no enable_thinking switch"):
        training_texts(real_config(path, "enable_thinking=true"), None, 0, qwen_style_tokenizer)
    for key, value in [("prompt_column", "question"), ("answer_column", "label"), ("enable_thinking", "false")]:
        with pytest.raises(ConfigError, match=rf"{key}: applies to real models"):
            load_config(TrainConfig, ROOT / "configs/train_quick.yaml", [f"{key}={value}"])
        with pytest.raises(ConfigError, match=rf"{key}: applies to real models"):
            load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", [f"{key}={value}"])


def test_new_keys_at_default_keep_run_names():
    new = {"prompt_column", "answer_column", "enable_thinking"}
    assert not (new | {"answer_check"}) & set(TrainConfig().fingerprint())
    # the default `make train-taopd` run keeps the name it had before these keys (and answer_check) existed
    assert TrainConfig().run_id() == "train-e637b1fa"
    saved = ROOT / "results/train/trace-final/config.json"  # that run, where this checkout holds it
    if saved.is_file():
        expected = {**json.loads(saved.read_text()), "run_name": "", "out_dir": "results/train"}
        assert TrainConfig().fingerprint() == expected
    assert TrainConfig(answer_check="math").run_id() != TrainConfig().run_id()
    real = {"student": "s", "teacher": "t", "prompts": "p.jsonl", "eval_prompts": "p.jsonl"}
    assert TrainConfig(**real, enable_thinking=False).run_id() != TrainConfig(**real).run_id()
    assert not new & set(DiagnoseConfig().fingerprint())
    pair = {k: real[k] for k in ("student", "teacher", "prompts")}
    assert DiagnoseConfig(**pair, enable_thinking=False).run_id() != DiagnoseConfig(**pair).run_id()


def test_load_problems_is_the_prompt_set_loader(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q0", "answer": 7}\n\n{"prompt": [{"role": "user", "content": "q1"}]}\n')
    problems = load_problems(path)
    assert [(p.prompt, p.answer) for p in problems] == [("q0", "7"), (({"role": "user", "content": "q1"},), "")]
    path.write_text('{"prompt": "q0"}\n{"prompt": 123}\n')
    with pytest.raises(PromptSetError, match=r"p\.jsonl: row 2 \(line 2\): the prompt must be text"):
        load_problems(path)
    path.write_text('{"prompt": "q0"}\n{"prompt": "sort\n')
    with pytest.raises(PromptSetError, match=r"p\.jsonl: line 2: invalid JSON"):
        load_problems(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")


def test_diagnose_on_a_real_style_pair_with_a_parquet_set(tmp_path, small_testbed):
    """The small testbed's pair given as paths (a real-model run), its held-out prompts as message lists."""
    from diagnostics.testbed.config import heldout_problems as testbed_heldout

    questions = [p.prompt for p in testbed_heldout(small_testbed.config, 4, split_seed=BANK_SPLIT_SEED)]
    path = write_parquet_set(tmp_path / "set.parquet", questions, system=False)
    config = load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", [
        f"student={small_testbed.student_path}", f"teacher={small_testbed.teacher_path}", f"prompts={path}",
        "answer_column=reward_model.ground_truth", "n_sequences=2", "shard_sequences=2", "max_new_tokens=8",
        "backend=hf", "group_selectors=[random]", f"out_dir={tmp_path}", "n_boot=10"])
    run_dir = run_diagnose(config, progress=False)
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    assert tokens["seq_id"].nunique() == 2 and tokens["gain"].notna().all()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["answer_column"] == "reward_model.ground_truth" and "enable_thinking" not in saved
