"""Memory-bounded chunking of dense [b, T, V] log-probs (`diagnostics.lm.forward.sequence_chunks`,
`map_sequence_chunks`): the group variant, a diagnose shard and training's evaluation give the same numbers
chunked as in one piece."""

from __future__ import annotations

import copy

import torch

from diagnostics import diagnose, engine
from diagnostics.lm.forward import ResponseBatch, full_logprobs, map_sequence_chunks, sequence_chunks
from diagnostics.lm.models import ModelPair

from tiny_lm import V, random_ids, tiny_model

TOL = 1e-6  # float32: chunking changes only the order of the group gradient's sum


def tiny_pair() -> tuple[ModelPair, ResponseBatch]:
    prompts, responses = random_ids(torch.Generator().manual_seed(0))
    bank = ResponseBatch.from_ids(prompts, responses, pad_id=0)
    pair = ModelPair(tiny_model(1).eval(), tiny_model(2).eval(), None, V, "", "", torch.device("cpu"), torch.float32)
    return pair, bank


def test_sequence_chunks_cover_the_rows_within_the_budget():
    horizon, vocab = 74, 151_936
    per_row = horizon * vocab * 4
    chunks = sequence_chunks(64, horizon, vocab, budget_bytes=3.5 * per_row)
    assert [c.stop - c.start for c in chunks] == [3] * 21 + [1]
    assert chunks[0].start == 0 and chunks[-1].stop == 64
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert len(sequence_chunks(5, horizon, vocab, budget_bytes=1)) == 5  # at least one row each
    assert sequence_chunks(64, 10, 37, max_rows=16) == [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)]


def test_map_sequence_chunks_equals_one_piece():
    pair, bank = tiny_pair()

    def kl(part: ResponseBatch, _rows) -> dict[str, torch.Tensor]:
        return {"kl": engine.kl_forward(full_logprobs(pair.teacher, part, V), full_logprobs(pair.student, part, V))}

    whole = kl(bank, slice(None))["kl"]
    one_row = map_sequence_chunks(kl, bank, V, budget_bytes=1)["kl"]
    torch.testing.assert_close(one_row, whole, rtol=0, atol=TOL)


def test_group_step_gains_chunked_equals_unchunked():
    pair, bank = tiny_pair()
    keep = torch.zeros_like(bank.valid)
    keep[0, 1] = keep[2, 0] = keep[3, 3] = keep[0, 4] = True
    for loss in ("reverse_kl", "sampled_pg"):
        step = engine.StepConfig(loss=loss, lr=1e-2)
        whole = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, V, dense_chunk_bytes=1e12)
        chunked = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, V, dense_chunk_bytes=1)
        assert torch.equal(whole.isnan(), chunked.isnan())
        assert whole[bank.valid].abs().max() > 1e-4  # the update moved something
        torch.testing.assert_close(chunked, whole, rtol=0, atol=TOL, equal_nan=True)


def test_diagnose_shard_chunked_equals_unchunked(monkeypatch):
    pair, bank = tiny_pair()
    config = diagnose.DiagnoseConfig(lr=1e-2, method="loop", group_selectors=[])
    whole = diagnose._shard_chunk(pair, bank, config, [4], 4, None)
    real_map = diagnose.map_sequence_chunks
    monkeypatch.setattr(diagnose, "map_sequence_chunks",
                        lambda fn, batch, vocab, **kw: real_map(fn, batch, vocab, budget_bytes=1))
    chunked = diagnose.compute_shard(pair, bank, config, [4], 4)
    assert whole.keys() == chunked.keys()
    for name in whole:
        if name == "gain_rel":  # gain / KL_before: the KL difference's float32 rounding, divided; compare as a gain
            scale = whole["kl_forward_before"]
            torch.testing.assert_close(chunked[name] * scale, whole[name] * scale, rtol=0, atol=TOL, equal_nan=True)
            continue
        # the release's top-K D reaches ~26 nats (its 1e-12 floor), where one float32 ulp is 1.9e-6: held relatively
        rtol = 1e-6 if name == "disagreement_topk_proxy" else 0
        torch.testing.assert_close(chunked[name], whole[name], rtol=rtol, atol=TOL, equal_nan=True, msg=name)


def test_training_live_gains_chunked_equals_unchunked(monkeypatch):
    from opd import monitor as evaluation

    pair, bank = tiny_pair()
    trained = copy.deepcopy(pair.student)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    whole_gain = evaluation.live_gains(pair.student, trained, pair.teacher, bank, V)
    real_chunks = evaluation.sequence_chunks
    monkeypatch.setattr(evaluation, "sequence_chunks",
                        lambda n, t, v, **kw: real_chunks(n, t, v, budget_bytes=1, max_rows=kw.get("max_rows")))
    chunked_gain = evaluation.live_gains(pair.student, trained, pair.teacher, bank, V)
    assert len(chunked_gain) == len(whole_gain) == len(bank)
    torch.testing.assert_close(torch.tensor(chunked_gain.to_numpy()), torch.tensor(whole_gain.to_numpy()), rtol=0,
                               atol=TOL)
