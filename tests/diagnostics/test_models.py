"""Tokenizer round trip and the teacher-student compatibility check."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from diagnostics.lm.models import IncompatibleModelsError, check_compatibility, check_pair, load_pair
from diagnostics.testbed.build import build_tokenizer


def test_tokenizer_round_trip(small_testbed):
    tok = AutoTokenizer.from_pretrained(small_testbed.student_path)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # what AutoTokenizer forces for every qwen2 checkpoint
    text = "sort ad ag aa bb :"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # one token per word
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(ids[1]) == "\u0120ad"
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert rendered == text


def test_padding_rows_are_dropped(small_testbed):
    tok, vocab = check_pair(small_testbed.student_path, small_testbed.teacher_path)
    assert vocab == len(tok)
    pair = load_pair(small_testbed.student_path, small_testbed.teacher_path, device="cpu")
    # the small teacher is padded to a multiple of 16 rows, the student is not
    assert pair.teacher.config.vocab_size > pair.student.config.vocab_size == pair.vocab_size


def test_changed_token_names_first_differing_id():
    student = build_tokenizer(30)
    vocab = dict(student.get_vocab())
    first, second = vocab["\u0120ad"], vocab["\u0120ag"]
    vocab["\u0120ad"], vocab["\u0120ag"] = second, first  # two ids now map to each other's strings
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in student._merges]
    teacher = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token=student.eos_token, pad_token=student.pad_token,
        unk_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    with pytest.raises(IncompatibleModelsError, match=rf"id {min(first, second)}: student 'Ġad' vs teacher 'Ġag'"):
        check_compatibility(student, teacher, len(student), len(student))


def test_vocab_rows_may_differ_only_by_padding():
    tok = build_tokenizer(30)
    n = len(tok)
    assert check_compatibility(tok, copy.deepcopy(tok), n, n + 64) == n
    with pytest.raises(IncompatibleModelsError, match=rf"student model has {n - 3} vocabulary rows"):
        check_compatibility(tok, copy.deepcopy(tok), n - 3, n)


def test_different_tokenizer_lengths_name_the_missing_id():
    small, big = build_tokenizer(30), build_tokenizer(31)
    with pytest.raises(IncompatibleModelsError, match=r"student '<no such id>' vs teacher 'Ġ"):
        check_compatibility(small, big, len(big), len(big))


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="student: model directory"):
        check_pair(str(tmp_path / "missing"), str(tmp_path / "missing"))
