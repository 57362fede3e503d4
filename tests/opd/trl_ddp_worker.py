"""One `SelectiveDistillationTrainer` step on a fixed global batch, split over however many processes run this.

Run as `python trl_ddp_worker.py OUT STUDENT TEACHER` (one process) or under
`accelerate launch --cpu --num_processes 2 trl_ddp_worker.py ...` (gloo). TRL's generation is replaced by
this process's contiguous share of the same 8 fixed (prompt, completion) pairs; everything else is TRL's
`Trainer.train` for one step (DDP wrap, the signals pass, selection over the batch gathered from every
process, the loss, the all-reduce, the optimizer step). The optimizer is SGD at lr 1, so the parameter
change is the gradient itself. For each (loss, normalisation) it writes OUT/<loss>_<normalization>_rank<r>.pt
with the parameters and the logged selection metrics; the test compares ranks and the one-process run.
"""

from __future__ import annotations

import os
import sys

import torch

N_ROWS = 8
CASES = (("reverse_kl", "kept_global"), ("sampled_pg", "kept_global"), ("sampled_pg", "per_sequence_mean"))


def fixed_batch(rank: int, size: int, vocab: int, eos: int, pad: int) -> dict[str, torch.Tensor]:
    """This process's rows of 8 fixed pairs (different lengths) as TRL's generation returns them:
    prompts left-padded, completions right-padded up to and including EOS."""
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(N_ROWS):
        prompt = torch.randint(2, vocab, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(2, vocab, (2 + (i * 5) % 7,), generator=gen).tolist() + [eos]
        pairs.append((prompt, completion))
    share = N_ROWS // size
    mine = pairs[rank * share : (rank + 1) * share]
    width_p, width_c = max(len(p) for p, _ in mine), max(len(c) for _, c in mine)
    out = {"prompt_ids": torch.full((share, width_p), pad), "completion_ids": torch.full((share, width_c), pad),
           "prompt_mask": torch.zeros(share, width_p, dtype=torch.long),
           "completion_mask": torch.zeros(share, width_c, dtype=torch.long)}
    for row, (p, c) in enumerate(mine):
        out["prompt_ids"][row, width_p - len(p) :] = torch.tensor(p)
        out["prompt_mask"][row, width_p - len(p) :] = 1
        out["completion_ids"][row, : len(c)] = torch.tensor(c)
        out["completion_mask"][row, : len(c)] = 1
    return out


def main(out: str, student_path: str, teacher_path: str) -> None:
    torch.set_num_threads(1)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from diagnostics.lm.models import load_model
    from opd.config import TrainConfig
    from opd.integrations.trl import SelectiveDistillationTrainer, cut_vocab, distillation_config

    tokenizer = AutoTokenizer.from_pretrained(student_path, padding_side="left")
    vocab = len(tokenizer)

    def generate(self, inputs):  # replaces TRL's generation: this process's rows of the fixed batch
        state = self.accelerator
        batch = fixed_batch(state.process_index, state.num_processes, vocab, tokenizer.eos_token_id,
                            tokenizer.pad_token_id)
        batch = {k: v.to(state.device) for k, v in batch.items()}
        batch["num_items_in_batch"] = state.gather(batch["completion_mask"].sum()).sum()
        return batch

    trl.DistillationTrainer._generate_and_score_completions = generate
    cpu = torch.device("cpu")
    for loss, normalization in CASES:
        student = cut_vocab(load_model(student_path, cpu, torch.float32), vocab).train()
        teacher = cut_vocab(load_model(teacher_path, cpu, torch.float32), vocab).eval()
        config = TrainConfig(loss=loss, normalization=normalization, batch_size=N_ROWS, steps=1, lr=1.0)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        args = distillation_config(config, max_new_tokens=8, seed=0, output_dir=f"{out}/trl", processes=processes,
                                   use_cpu=True, disable_tqdm=True, logging_steps=1, report_to="none")
        trainer = SelectiveDistillationTrainer(
            model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
            optimizers=(torch.optim.SGD(student.parameters(), lr=1.0), None),
            train_dataset=Dataset.from_dict({"prompt": ["x"] * N_ROWS}), selector="teachability", ratio=0.3,
            min_per_sequence=1, k=4, loss=loss, normalization=normalization)
        trainer.train()
        rank = trainer.accelerator.process_index
        logged = next(row for row in trainer.state.log_history if "selection/kept_tokens" in row)
        params = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        torch.save({"params": params, "logged": logged}, f"{out}/{loss}_{normalization}_rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
