"""One TA-OPD training step at 5% retention vs full-token OPD: time, peak memory, LM-head + loss memory.

Two configurations:
  testbed  the embedded testbed's student (V = the testbed vocabulary), 32 rollouts of prompt 10 +
           response 9 tokens (the default training batch);
  large    a randomly initialised Qwen2 student with a 50,000-token vocabulary, hidden 256, 2 layers,
           on fake rollouts of 64 sequences x 256 tokens (prompt 16 + response 240).
For each configuration and ratio (0.05, 1.0), every measurement runs in a FRESH subprocess (so the
resident-set high-water mark is clean; torch has no CPU allocator statistics), with a random kept
mask of the ratio and the default loss (sampled_pg, kept_global):
  step   `opd.step.opd_step` + AdamW step: wall time (second call) and peak RSS (first call);
  loss   `opd_step` alone (forward of the kept positions, loss, backward): peak RSS above the start;
  base   the same decoder forward + backward with a dummy loss on the kept hidden states, no LM head.
LM-head + loss memory = peak(loss) - peak(base): the memory of the [n, V] logits, their
log-softmax and gradients, which scales with the number n of kept positions. Target: <= 15% at 5%.
Teacher scoring (no grad, chunked over positions) is the same at every ratio and not included.

Usage: python benchmarks/bench_train.py [--device cuda]  (about 3-5 minutes on a 2-core CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATIOS = (0.05, 1.0)
CONFIGS = {
    "testbed": {"n": 32, "prompt": 10, "response": 9},
    "large": {"n": 64, "prompt": 16, "response": 240, "vocab": 50_000, "hidden": 256, "layers": 2, "heads": 4,
              "intermediate": 512},
}


def build(name: str, device: str = "cpu"):
    """(student, vocab size, ResponseBatch, signals) for a configuration; deterministic."""
    import torch

    from diagnostics.lm.forward import ResponseBatch

    spec = CONFIGS[name]
    if name == "testbed":
        from diagnostics.core.config import load_config
        from diagnostics.lm.models import check_pair, load_model
        from diagnostics.testbed.build import build_testbed
        from diagnostics.testbed.config import TestbedConfig

        testbed = build_testbed(load_config(TestbedConfig, ROOT / "configs/testbed.yaml"), progress=False)
        _, vocab = check_pair(testbed.student_path, testbed.teacher_path)
        student = load_model(testbed.student_path, torch.device(device), torch.float32)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        vocab = spec["vocab"]
        config = Qwen2Config(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                             num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                             num_key_value_heads=spec["heads"], max_position_embeddings=512, tie_word_embeddings=False)
        student = Qwen2ForCausalLM(config).to(device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (spec["n"], spec["prompt"]), generator=gen).tolist()
    responses = torch.randint(0, vocab, (spec["n"], spec["response"]), generator=gen).tolist()
    valid = torch.ones(spec["n"], spec["response"], dtype=torch.bool)
    batch = ResponseBatch.from_ids(prompts, responses, 0, valid)
    signals = {"student_logprob_sampled": -torch.rand(valid.shape, generator=gen) * 5 - 1,
               "teacher_logprob_sampled": -torch.rand(valid.shape, generator=gen) * 5 - 1}
    return student.train(), vocab, batch, signals


def keep_mask(valid, ratio: float):
    import torch

    from diagnostics.signals import select

    score = torch.rand(valid.shape, generator=torch.Generator().manual_seed(1))
    return select(score, valid, ratio, min_per_sequence=1)


def measure(name: str, ratio: float, mode: str, device: str = "cpu") -> dict:
    """One measurement in this (fresh) process; memory is RSS on CPU, the CUDA allocator's on GPU."""
    import torch

    torch.set_num_threads(1)
    dev = torch.device(device)
    from diagnostics.lm.forward import PositionLM, kept_index
    from opd.config import TrainConfig
    from opd.distributed import World
    from opd.memory import peak_mb, reset_peak
    from opd.step import opd_step
    from opd.trainer import make_optimizer

    student, vocab, batch, signals = build(name, device)
    keep = keep_mask(batch.valid, ratio)
    world = World.create(device)
    batch = batch.to(dev)
    keep = keep.to(dev)
    config = TrainConfig()
    model = PositionLM(student, vocab)
    optimizer = make_optimizer(student, config)

    def run() -> None:
        if mode == "base":
            rows, _, cols = kept_index(batch, keep)
            decoder = student.get_decoder()
            out = decoder(input_ids=batch.ids, attention_mask=batch.attention_mask, use_cache=False)
            out.last_hidden_state[rows, cols].sum().backward()
        else:
            opd_step(model, model, batch, signals, keep, config, world)
            if mode == "step":
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = peak_mb(dev)  # high-water mark so far (models and batch loaded)
    reset_peak(dev)
    start = _current_mb(dev)
    started = time.perf_counter()
    run()
    _sync(dev)
    seconds = time.perf_counter() - started
    peak = peak_mb(dev)
    if mode == "step":  # time a second call: the first one pays one-off allocations
        started = time.perf_counter()
        run()
        _sync(dev)
        seconds = time.perf_counter() - started
    return {"config": name, "ratio": ratio, "mode": mode, "kept": int(keep.sum()), "positions": int(batch.valid.sum()),
            "vocab": vocab, "seconds": seconds, "peak_mb": peak, "added_mb": peak - start, "loaded_mb": before}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_mb(device) -> float:
    """Memory in use now: CUDA allocated, or the process RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(device: str = "cpu") -> None:
    results = {}
    for name in CONFIGS:
        for ratio in RATIOS:
            for mode in ("step", "loss", "base"):
                out = subprocess.run([sys.executable, __file__, "--one", name, str(ratio), mode, device],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(f"{name} ratio={ratio} {mode} failed:\n{out.stderr[-3000:]}")
                result = results[(name, ratio, mode)] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  measured {name:8s} ratio {ratio:<5} {mode:5s}: {result['seconds']:.3f} s, "
                      f"+{result['added_mb']:.0f} MB", flush=True)
    memory = "CUDA max allocated" if device.startswith("cuda") else "RSS high-water"
    print(f"\none training step (opd_step + AdamW) on {device}, sampled_pg, kept_global; "
          f"memory = {memory} in a fresh process")
    print(f"{'config':8s} {'ratio':>6s} {'kept':>6s} {'step s':>8s} {'peak MB':>8s} {'LM-head+loss MB':>16s} "
          f"{'[n, V] fp32 MB':>15s}")
    for name in CONFIGS:
        head = {}
        for ratio in RATIOS:
            step, loss, base = (results[(name, ratio, m)] for m in ("step", "loss", "base"))
            head[ratio] = loss["added_mb"] - base["added_mb"]
            logits_mb = step["kept"] * step["vocab"] * 4 / 2**20  # one [n, V] float32 tensor
            print(f"{name:8s} {ratio:6.2f} {step['kept']:6d} {step['seconds']:8.3f} {step['peak_mb']:8.0f} "
                  f"{head[ratio]:16.1f} {logits_mb:15.2f}")
        s5, s1 = results[(name, 0.05, "step")], results[(name, 1.0, "step")]
        verdict = "(target <= 15%)" if head[1.0] >= 16 else "(below the measurement's MB resolution: not meaningful)"
        print(f"{name:8s} 5% / full: step time {s5['seconds'] / s1['seconds']:.2f}x, "
              f"step peak memory {s5['peak_mb'] / s1['peak_mb']:.2f}x, "
              f"added step memory {s5['added_mb'] / max(s1['added_mb'], 1e-9):.2f}x, "
              f"LM-head+loss memory {head[0.05] / max(head[1.0], 1e-9):.1%} {verdict}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5])))
    else:
        main(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu")
