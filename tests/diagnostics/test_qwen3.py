"""Qwen3-shaped random pairs (diagnostics.testbed.qwen3): the published shapes, the offline Qwen3 tokenizer and
chat template, and a depth-2 pair of the family through the Auto classes, one diagnose shard and one train step."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from diagnostics.core.config import ConfigError, load_config
from diagnostics.diagnose import run_diagnose
from diagnostics.diagnose_config import DiagnoseConfig
from diagnostics.testbed.qwen3 import (
    QWEN3_SHAPES,
    QWEN3_TOKENIZER_LENGTH,
    Qwen3PairConfig,
    build_qwen3_pair,
    qwen3_config,
    qwen3_tokenizer,
)
from opd.config import TrainConfig
from opd.engines import run_training

ROOT = Path(__file__).resolve().parents[2]
# The model cards' "Number of Parameters (Non-Embedding)" (huggingface.co/Qwen/Qwen3-<size>): an independent
# check of the config numbers (the cards round to 0.01B-0.1B)
NON_EMBEDDING_B = {"0.6B": 0.44, "1.7B": 1.4, "4B": 3.6, "8B": 6.95, "14B": 13.2}
TOTAL_B = {"0.6B": 0.6, "1.7B": 1.7, "4B": 4.0, "8B": 8.2, "14B": 14.8}


@pytest.mark.parametrize("size", list(QWEN3_SHAPES))
def test_shapes_give_the_published_parameter_counts(size):
    config = qwen3_config(size)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    embedding = model.get_input_embeddings().weight.numel() / 1e9
    non_embedding = total - embedding * (1 if config.tie_word_embeddings else 2)
    assert non_embedding == pytest.approx(NON_EMBEDDING_B[size], abs=0.05)
    assert total == pytest.approx(TOTAL_B[size], abs=0.05)
    assert (config.head_dim, config.num_key_value_heads, config.vocab_size) == (128, 8, 151_936)
    assert config.rope_parameters["rope_theta"] == 1_000_000
    layer = model.model.layers[0].self_attn
    assert hasattr(layer, "q_norm") and hasattr(layer, "k_norm")  # Qwen3's q/k RMS norms


def test_tokenizer_is_qwen3s():
    tokenizer = qwen3_tokenizer()
    assert len(tokenizer) == QWEN3_TOKENIZER_LENGTH == 151_669
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<think>", "</think>")] == \
        [151_643, 151_645, 151_667, 151_668]
    assert tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"][0] == 151_667
    chat = [{"role": "user", "content": "2+2?"}]
    def render(**kw):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kw)

    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render(enable_thinking=False) == prompt + "<think>\n\n</think>\n\n"  # answers directly
    assert render() == render(enable_thinking=True) == prompt


def test_config_errors():
    with pytest.raises(ConfigError, match="student"):
        load_config(Qwen3PairConfig, ROOT / "configs/qwen3_pair.yaml", ["student=3B"])
    with pytest.raises(ConfigError, match="num_layers"):
        load_config(Qwen3PairConfig, ROOT / "configs/qwen3_pair.yaml", ["num_layers=-1"])


@pytest.fixture(scope="module")
def depth2_pair():
    """The 0.6B-student / 1.7B-teacher family at depth 2 (0.67 GB + 1.35 GB float32), cached in .cache/qwen3."""
    config = load_config(Qwen3PairConfig, ROOT / "configs/qwen3_pair.yaml",
                         ["num_layers=2", f"cache_dir={ROOT / '.cache/qwen3'}"])
    return build_qwen3_pair(config)


def write_prompts(path: Path, n: int) -> str:
    lines = [json.dumps({"prompt": f"What is {i} plus {i}? Answer with a number.", "answer": str(2 * i)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_depth2_pair_loads_through_the_auto_classes(depth2_pair):
    student, teacher = depth2_pair
    for path, size in ((student, "0.6B"), (teacher, "1.7B")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert type(model) is Qwen3ForCausalLM
        expected = qwen3_config(size, 2).to_diff_dict()
        saved = AutoConfig.from_pretrained(path).to_diff_dict()
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "num_hidden_layers", "vocab_size", "tie_word_embeddings", "rope_parameters"):
            assert saved.get(key) == expected.get(key), key
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert len(tokenizer) == 151_669 and "enable_thinking" in tokenizer.chat_template


@pytest.mark.slow
def test_depth2_pair_runs_a_diagnose_shard_and_a_train_step(depth2_pair, tmp_path):
    student, teacher = depth2_pair
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    config = DiagnoseConfig(student=student, teacher=teacher, prompts=prompts, enable_thinking=False, n_sequences=2,
                            max_new_tokens=3, max_response_tokens=3, shard_sequences=2, group_selectors=[],
                            method="loop", backend="hf", device="cpu", dtype="float32", out_dir=str(tmp_path / "d"))
    run_dir = run_diagnose(config, progress=False)
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    assert len(tokens) == 6 and tokens["gain"].notna().all()
    assert sorted(p.name for p in (run_dir / "shards").iterdir()) == ["shard_0000.pt"]
    train = TrainConfig(student=student, teacher=teacher, prompts=prompts, eval_prompts=prompts, enable_thinking=False,
                        selectors=["full"], seeds=[0], steps=1, batch_size=2, max_new_tokens=3, eval_every=1,
                        eval_problems=2, bank_sequences=2, bank_max_tokens=3, checkpoint_every=0, save_students=False,
                        device="cpu", dtype="float32", out_dir=str(tmp_path / "t"), progress=False)
    metrics = pd.read_parquet(run_training(train) / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1] and metrics["loss"].iloc[1:].notna().all()
