"""`opd.integrations.trl.SelectiveDistillationTrainer`: the kept mask reaches TRL's loss, one TRL step equals
the project's `opd_step` on the same batch and mask, and its selection equals the registry's on the same signals."""

from __future__ import annotations

import pytest
import torch
import trl
from transformers import AutoTokenizer

from diagnostics.lm.forward import PositionLM, ResponseBatch, kept_index
from diagnostics.lm.models import load_model
from diagnostics.losses import kl_divergence
from diagnostics.signals import select, selection_scores, token_signals
from opd.config import TrainConfig
from opd.distributed import World
from opd.integrations.trl import (
    SELECTION_SIGNALS,
    TOKEN_LOGPROBS,
    SelectiveDistillationTrainer,
    cut_vocab,
    distillation_config,
)
from opd.step import opd_step

pytestmark = pytest.mark.slow  # builds (or reuses) the small testbed

# The update compared is one SGD step at lr 1: the parameter change IS the gradient, so <= 1e-6 on it is the
# strictest form. (Adam divides by sqrt(v) + eps and so turns float noise on gradients that are mathematically 0,
# e.g. k_proj's bias under the shift-invariant softmax, into steps of ~lr * noise / (noise + eps): 5e-6 here.)
LR = 1.0
PROMPTS = [[5, 9, 12, 3, 7, 2], [8, 4, 6, 10], [11, 13, 2, 5, 9]]  # different lengths: TRL left-pads them
RESPONSES = [[20, 21, 22, 23, 24], [25, 26, 27], [28, 29, 30, 31]]


@pytest.fixture(scope="module")
def pair(small_testbed):
    """(tokenizer, vocab size, student path, teacher path) of the small testbed."""
    tokenizer = AutoTokenizer.from_pretrained(small_testbed.student_path, padding_side="left")
    return tokenizer, len(tokenizer), small_testbed.student_path, small_testbed.teacher_path


def load_pair(pair) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Fresh float32 student and teacher, both cut to the tokenizer's vocabulary (TRL needs equal sizes)."""
    _, vocab, student_path, teacher_path = pair
    cpu = torch.device("cpu")
    student = cut_vocab(load_model(student_path, cpu, torch.float32), vocab)
    return student, cut_vocab(load_model(teacher_path, cpu, torch.float32), vocab).eval()


def trl_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """The batch as TRL's generation step returns it: prompts left-padded, completions right-padded."""
    width_p, width_c = max(map(len, PROMPTS)), max(map(len, RESPONSES))
    out = {name: torch.full((len(PROMPTS), w), fill, dtype=torch.long)
           for name, w, fill in (("prompt_ids", width_p, pad_id), ("prompt_mask", width_p, 0),
                                 ("completion_ids", width_c, pad_id), ("completion_mask", width_c, 0))}
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        out["prompt_ids"][row, width_p - len(p) :] = torch.tensor(p)
        out["prompt_mask"][row, width_p - len(p) :] = 1
        out["completion_ids"][row, : len(r)] = torch.tensor(r)
        out["completion_mask"][row, : len(r)] = 1
    out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def valid_mask() -> torch.Tensor:
    return trl_batch(0)["completion_mask"].bool()  # [B, C]


def some_mask() -> torch.Tensor:
    """A kept mask with several positions in row 0, one in row 1 and none in row 2."""
    keep = torch.zeros_like(valid_mask())
    keep[0, [0, 2, 3]] = True
    keep[1, 1] = True
    return keep


def make_trainer(pair, monkeypatch, tmp_path, keep: torch.Tensor | None, loss: str = "reverse_kl",
                 normalization: str = "kept_global", **selection):
    """A SelectiveDistillationTrainer whose generation step returns `trl_batch` and, if `keep` is given,
    whose selection returns `keep`; plain SGD at lr 1 as its optimizer (see LR)."""
    tokenizer, vocab, _, _ = pair
    monkeypatch.setattr(trl.DistillationTrainer, "_generate_and_score_completions",
                        lambda self, inputs: trl_batch(tokenizer.pad_token_id))
    if keep is not None:
        monkeypatch.setattr(SelectiveDistillationTrainer, "select_positions", lambda self, signals, valid: keep.clone())
    student, teacher = load_pair(pair)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    config = TrainConfig(loss=loss, normalization=normalization, batch_size=len(PROMPTS), steps=1, lr=LR)
    args = distillation_config(config, max_new_tokens=max(map(len, RESPONSES)), seed=0, output_dir=str(tmp_path),
                               use_cpu=True, disable_tqdm=True)
    from datasets import Dataset

    return SelectiveDistillationTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer, optimizers=(optimizer, None),
        train_dataset=Dataset.from_dict({"prompt": ["x"] * len(PROMPTS)}), k=4, loss=loss,
        normalization=normalization, **selection)


def trl_gradient(trainer) -> dict[str, torch.Tensor]:
    """One TRL training step (generation patched): the gradients it leaves in .grad."""
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    trainer.optimizer.zero_grad(set_to_none=False)
    trainer.training_step(trainer.model, [{"prompt": "x"}] * len(PROMPTS), None)
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def project_step(pair, keep: torch.Tensor, loss: str, normalization: str = "kept_global",
                 token_logprobs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The project's `opd_step` on the same batch, mask and old / teacher token log-probs (the TRL signals
    pass's `token_logprobs`; zeros when the loss does not read them), then the same SGD step: new parameters."""
    tokenizer, vocab, _, _ = pair
    student, teacher = load_pair(pair)
    batch = ResponseBatch.from_ids(PROMPTS, RESPONSES, tokenizer.pad_token_id, valid_mask())
    token_logprobs = token_logprobs or {name: torch.zeros(keep.shape) for name in TOKEN_LOGPROBS}
    signals = {"student_logprob_sampled": token_logprobs["old_logprobs"],
               "teacher_logprob_sampled": token_logprobs["teacher_token_logprobs"]}
    config = TrainConfig(loss=loss, normalization=normalization, lr=LR)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    opd_step(PositionLM(student, vocab).train(), PositionLM(teacher, vocab).eval(), batch, signals, keep, config,
             World.create("cpu"))
    optimizer.step()
    return {name: p.detach().clone() for name, p in student.named_parameters()}


def naive_gradient(pair, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: full [B, L, V] logits of right-padded sequences, KL(pS || pT) summed over kept positions
    in a Python loop, divided by the kept count, backward."""
    tokenizer, _, _, _ = pair
    student, teacher = load_pair(pair)
    batch = ResponseBatch.from_ids(PROMPTS, RESPONSES, tokenizer.pad_token_id, valid_mask())
    s_lp = torch.log_softmax(student(input_ids=batch.ids, attention_mask=batch.attention_mask).logits, -1)
    with torch.no_grad():
        t_lp = torch.log_softmax(teacher(input_ids=batch.ids, attention_mask=batch.attention_mask).logits, -1)
    total = torch.zeros(())
    for b, t in keep.nonzero().tolist():
        idx = int(batch.pred_idx[b, t])
        total = total + kl_divergence(s_lp[b, idx], t_lp[b, idx]) / max(int(keep.sum()), 1)
    if keep.any():
        total.backward()
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in student.named_parameters()}


def test_cut_vocab_keeps_the_logits_of_the_shared_vocabulary(pair):
    tokenizer, vocab, _, teacher_path = pair
    full = load_model(teacher_path, torch.device("cpu"), torch.float32)
    cut = cut_vocab(load_model(teacher_path, torch.device("cpu"), torch.float32), vocab)
    assert full.config.vocab_size > vocab == cut.config.vocab_size == cut.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([PROMPTS[0] + RESPONSES[0]])
    torch.testing.assert_close(cut(input_ids=ids).logits, full(input_ids=ids).logits[..., :vocab], rtol=1e-6, atol=1e-6)


def test_masked_positions_contribute_no_gradient(pair, monkeypatch, tmp_path):
    keep = some_mask()
    grads = trl_gradient(make_trainer(pair, monkeypatch, tmp_path, keep))
    reference = naive_gradient(pair, keep)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    full = trl_gradient(make_trainer(pair, monkeypatch, tmp_path / "full", valid_mask()))
    assert any(not torch.allclose(full[n], grads[n]) for n in grads)  # the mask changed the update


def test_all_masked_batch_gives_zero_gradient(pair, monkeypatch, tmp_path):
    grads = trl_gradient(make_trainer(pair, monkeypatch, tmp_path, torch.zeros_like(valid_mask())))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


@pytest.mark.parametrize("normalization", ["kept_global", "per_sequence_mean"])
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "sampled_pg"])
def test_one_trl_step_equals_opd_step(pair, monkeypatch, tmp_path, loss, normalization):
    keep = some_mask()  # rows keep 3, 1 and 0 positions: per_sequence_mean weighs them unlike kept_global
    trainer = make_trainer(pair, monkeypatch, tmp_path, keep, loss=loss, normalization=normalization)
    assert trainer.registry_loss == (loss == "sampled_pg" or normalization == "per_sequence_mean")
    signals, _ = trainer.completion_signals(trl_batch(pair[0].pad_token_id))  # before the step: the old policy
    trl_gradient(trainer)
    trainer.optimizer.step()
    expected = project_step(pair, keep, loss, normalization, {n: signals[n] for n in TOKEN_LOGPROBS})
    base = {n: p.detach() for n, p in load_pair(pair)[0].named_parameters()}
    assert max(float((expected[n] - base[n]).abs().max()) for n in base) > 1e-3  # not a vacuous comparison
    for name, param in trainer.model.named_parameters():
        assert (param.detach() - expected[name]).abs().max() <= 1e-6, name


def test_selection_equals_the_registry_on_the_same_signals(pair, monkeypatch, tmp_path):
    trainer = make_trainer(pair, monkeypatch, tmp_path, None, selector="teachability", ratio=0.3)
    batch = trl_batch(pair[0].pad_token_id)
    signals, valid = trainer.completion_signals(batch)
    keep = trainer.select_positions(signals, valid)
    # reference: the project's right-padded kept-position forward on every valid position
    student, teacher = load_pair(pair)
    responses = ResponseBatch.from_ids(PROMPTS, RESPONSES, pair[0].pad_token_id, valid_mask())
    rows, pos, cols = kept_index(responses, responses.valid)
    with torch.no_grad():
        logits = [PositionLM(m, pair[1])(responses.ids, responses.attention_mask, rows, cols)
                  for m in (student, teacher)]
    expected = token_signals(logits[0], logits[1], 4)
    for name in SELECTION_SIGNALS:
        grid = torch.zeros(valid.shape)
        grid[rows, pos] = expected[name]
        torch.testing.assert_close(signals[name], grid, rtol=1e-4, atol=1e-5, msg=name)
    scores = selection_scores({n: signals[n] for n in SELECTION_SIGNALS}, valid, seed=trainer._selection_seed())
    assert torch.equal(keep, select(scores["teachability"], valid, 0.3, min_per_sequence=1))
    assert keep.any(dim=1).all() and keep.sum() < valid.sum()


def test_training_step_logs_the_selection(pair, monkeypatch, tmp_path):
    trainer = make_trainer(pair, monkeypatch, tmp_path, None, selector="entropy", ratio=0.25)
    trl_gradient(trainer)
    metrics = trainer._metrics["train"]
    n_valid, budget = int(valid_mask().sum()), 3  # ceil(0.25 * 12), then at least one per completion
    (kept,) = metrics["selection/kept_tokens"]
    assert budget <= kept <= budget + len(PROMPTS)
    assert metrics["selection/effective_ratio"] == [pytest.approx(kept / n_valid)]
    for name in SELECTION_SIGNALS:
        assert len(metrics[f"selection/{name}_kept"]) == len(metrics[f"selection/{name}_all"]) == 1


def test_distillation_config_maps_the_train_config(tmp_path):
    config = TrainConfig(loss="forward_kl", batch_size=8, samples_per_prompt=2, steps=7, lr=3e-4, weight_decay=0.05,
                         betas=[0.8, 0.99], temperature=0.7, top_p=1.0)
    args = distillation_config(config, max_new_tokens=51, seed=3, output_dir=str(tmp_path), processes=2, use_cpu=True)
    assert (args.per_device_train_batch_size, args.max_steps, args.max_completion_length, args.beta) == (8, 7, 51, 0.0)
    assert (args.learning_rate, args.weight_decay, args.adam_beta1, args.adam_beta2) == (3e-4, 0.05, 0.8, 0.99)
    assert (args.temperature, args.top_p, args.top_k, args.max_grad_norm, args.bf16) == (0.7, 1.0, 0, 0.0, False)
    assert args.lr_scheduler_type == "constant" and args.shuffle_dataset is False and args.seed == 3
    assert distillation_config(TrainConfig(loss="sampled_pg"), max_new_tokens=9, seed=0,
                               output_dir=str(tmp_path), use_cpu=True).beta == 1.0  # unused by the registry path
    with pytest.raises(ValueError, match="divisible"):
        distillation_config(TrainConfig(batch_size=3), max_new_tokens=9, seed=0, output_dir=str(tmp_path), processes=2)


def test_trainer_refuses_bad_loss_settings(pair, monkeypatch, tmp_path):
    for kwargs, match in (({"loss": "nope"}, "loss"), ({"normalization": "nope"}, "normalization")):
        with pytest.raises(ValueError, match=match):
            make_trainer(pair, monkeypatch, tmp_path, None, **kwargs)


def test_selection_equals_the_project_trainer_with_non_default_options(pair, monkeypatch, tmp_path):
    """The release's options (top-K proxy signals, its tie order, top-up by another score): the TRL trainer's
    mask equals `opd.step.select_kept`'s on the same signals, seed and arm."""
    from diagnostics.signals import SelectionOptions
    from opd.config import Arm
    from opd.step import select_kept

    options = SelectionOptions(signals="release_topk", normalization="all_response_rows", tie_break="earliest_position",
                               top_up="teachability_entropy_ndc")
    trainer = make_trainer(pair, monkeypatch, tmp_path, None, selector="teachability", ratio=0.2, min_per_sequence=1,
                           selection_options=options)
    signals, valid = trainer.completion_signals(trl_batch(pair[0].pad_token_id))
    assert set(options.source_keys()) <= set(signals) and options.source_keys() != SELECTION_SIGNALS
    keep = trainer.select_positions(signals, valid)
    expected = select_kept(signals, valid, Arm("teachability", 0.2, 0), 1, World.create("cpu"),
                           seed=trainer._selection_seed(), options=options)
    assert torch.equal(keep, expected) and keep.any(dim=1).all()
