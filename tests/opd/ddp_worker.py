"""One OPD update on fixed rollouts, split over however many processes run this script.

Run as `python ddp_worker.py OUT STUDENT TEACHER` (one process) or under
`accelerate launch --cpu --num_processes 2 ddp_worker.py ...`. Every process takes its contiguous
share of the same 8 fixed rollouts, scores them, selects over the gathered batch, runs
`opd.step.opd_step` (2 micro-batches) and one AdamW step, then writes its parameters to
OUT/<normalization>_rank<r>.pt. The test compares them across ranks and with the one-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diagnostics.generation.hf import score_rollouts_hf
from diagnostics.lm.forward import PositionLM, ResponseBatch
from diagnostics.lm.models import load_model
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.step import opd_step, select_kept
from opd.trainer import make_optimizer

N_ROWS = 8


def fixed_rollouts(vocab: int, eos: int):
    """8 rollouts with different prompt and response lengths (the same on every process)."""
    import pandas as pd

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N_ROWS):
        prompt = torch.randint(2, vocab, (3 + i % 3,), generator=gen).tolist()
        response = torch.randint(2, vocab, (2 + (i * 5) % 7,), generator=gen).tolist() + [eos]
        rows.append({"prompt_id": i, "sample_idx": 0, "prompt_ids": prompt, "response_ids": response})
    return pd.DataFrame(rows)


def main(out: str, student_path: str, teacher_path: str) -> None:
    torch.set_num_threads(1)
    world = World.create("cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    vocab = len(tokenizer)
    teacher = PositionLM(load_model(teacher_path, world.device, torch.float32), vocab)
    rollouts = fixed_rollouts(vocab, tokenizer.eos_token_id).iloc[world.local_rows(N_ROWS)].reset_index(drop=True)
    for normalization in ("kept_global", "per_sequence_mean"):
        config = TrainConfig(testbed_config="configs/testbed_small.yaml", normalization=normalization,
                             micro_batch_size=2, lr=1e-3)
        student = load_model(student_path, world.device, torch.float32).train()
        model, optimizer = world.prepare(PositionLM(student, vocab), make_optimizer(student, config))
        scored = score_rollouts_hf(rollouts, student=student, teacher=teacher.model, vocab_size=vocab,
                                   stop_ids=[tokenizer.eos_token_id], k=4, progress=False)
        student.train()
        batch = ResponseBatch.from_ids(list(rollouts["prompt_ids"]), list(rollouts["response_ids"]),
                                       tokenizer.pad_token_id, scored.valid)
        keep = select_kept(scored.signals, scored.valid, Arm("teachability", 0.3, 0), 1, world, seed=0)
        stats = opd_step(model, teacher, batch, scored.signals, keep, config, world)
        optimizer.step()
        params = {name: p.detach().clone() for name, p in student.named_parameters()}
        torch.save({"params": params, "stats": stats}, Path(out) / f"{normalization}_rank{world.rank}.pt")
        world.release()
    world.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
