"""The trainer's non-finite guard: a blow-up stops the arm with the arm, step and quantity named.

`opd.trainer` calls two hooks:
* `check_weights` after every optimizer step: a NaN/inf weight raises `NonFiniteError` naming the
  parameter (the loss and gradient norm were finite; the update itself overflowed);
* `stop_arm` when a step raised: a `NonFiniteError` (loss, gradient norm, weights), or any other
  RuntimeError/ValueError that a blow-up explains -- a weight explosion that leaves the weights finite
  but the logits NaN makes `torch.multinomial` or the signal checks fail inside rollouts and scoring,
  far from the cause. `find_blowup` then looks at the weights, at the student's logits on the common
  bank and at the error's words; if none shows NaN/inf the original error is re-raised unchanged.
`stop_arm` writes `arms/<arm>/nonfinite.json` (arm, step, quantity, message, the last good checkpoint)
and raises `NonFiniteError` with the arm, step and quantity in its message.

The last good checkpoint: when the weights are still finite, the state after the last step whose checks
all passed (step - 1) is saved (`opd.checkpoint.save_checkpoint`); when the weights are already NaN/inf
nothing is saved over the arm's latest checkpoint, which stays the last good one (None: the base
student is the last good state). The record also gives max |w| of the saved state, so an exploded but
finite state is visible as such. An earlier periodic checkpoint is not deleted by that save: it is
renamed `ckpt-<step>.kept` (resume ignores it; it is there to go back to) and recorded as
`earlier_checkpoint`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NoReturn

import torch

from diagnostics.core.nonfinite import first_nonfinite_parameter, largest_weight, write_nonfinite_record
from opd.checkpoint import latest_checkpoint, save_checkpoint
from opd.step import NonFiniteError  # a diagnostics.nonfinite.NonFiniteError

KEPT_SUFFIX = ".kept"  # an earlier checkpoint set aside at a blow-up (save_checkpoint would delete it)


class WeightsNonFinite(NonFiniteError):
    """The optimizer step left a NaN/inf weight (the state before it is lost)."""


def check_weights(student: torch.nn.Module) -> None:
    """Raise WeightsNonFinite naming the first parameter with a NaN/inf entry (after an optimizer step)."""
    hit = first_nonfinite_parameter(student)
    if hit is not None:
        name, count, total = hit
        raise WeightsNonFinite(f"student weights non-finite after the optimizer step: {name} has {count} of "
                               f"{total} entries NaN/inf (the loss and gradient norm were finite; lower lr)")


def stop_together(world, err: BaseException | None) -> None:
    """Every process learns of an error raised on any process in a step's local phase (rollouts, scoring),
    before the next collective: the failing process re-raises its own error, the others raise NonFiniteError
    naming how many stopped, so no process waits in an all-reduce the failed one never reaches (a hang)."""
    failed = int(world.sum(int(err is not None)))
    if err is not None:
        raise err
    if failed:
        raise NonFiniteError(f"student logits non-finite on another process's rollouts ({failed} of {world.size} "
                             f"processes stopped this step; its record names the cause)")


def quantity_of(message: str) -> str:
    """A short name of what went non-finite (the first one the message names), for nonfinite.json."""
    for quantity in ("student weights", "student logits", "generation logits", "per-token loss", "gradient norm",
                     "loss"):
        if quantity in message:
            return quantity
    return "unknown"


def find_blowup(student: torch.nn.Module, bank, err: BaseException) -> str | None:
    """Why the student cannot produce finite logits, or None.

    A NaN/inf weight; else NaN/inf logits of one forward pass on the first sequences of the common bank
    (`bank`, a ResponseBatch: prompt + response; the weights are finite but exploded); else an error whose
    text reports NaN/inf values (the signal checks, `torch.multinomial`) -- the failing batch is gone, so
    its words are the evidence left. Runs under no_grad.
    """
    hit = first_nonfinite_parameter(student)
    if hit is not None:
        return f"student weights non-finite: {hit[0]} has {hit[1]} of {hit[2]} entries NaN/inf"
    device = next(student.parameters()).device
    with torch.no_grad():
        logits = student(input_ids=bank.ids[:2].to(device), attention_mask=bank.attention_mask[:2].to(device)).logits
    bad = ~torch.isfinite(logits)
    exploded = f"the weights are finite but exploded (largest |w| = {largest_weight(student):.3g}; lower lr)"
    if bool(bad.any()):
        return f"student logits non-finite ({int(bad.sum())} of {logits.numel()} entries on the bank): {exploded}"
    if re.search(r"\b(nan|inf)\b", str(err), flags=re.IGNORECASE):
        return f"student logits non-finite on this step's rollouts: {exploded}"
    return None


def stop_arm(
    err: Exception, *, arm_name: str, step: int, arm_dir: Path, student: torch.nn.Module, optimizer, state: dict,
    metrics: list[dict], world, bank,
) -> NoReturn:
    """Stop an arm whose step `step` raised `err`: re-raise `err` unless it is (or a blow-up explains it)
    a non-finite quantity; else keep the last good checkpoint, write nonfinite.json, raise NonFiniteError."""
    if isinstance(err, NonFiniteError):
        message = str(err)
    else:
        found = find_blowup(student, bank, err)
        if found is None:
            raise err
        message = f"{found} (it surfaced as {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    weights_finite = first_nonfinite_parameter(student) is None
    previous = latest_checkpoint(arm_dir)  # a periodic checkpoint, written while every check passed
    if weights_finite:  # the state after the last step whose checks passed
        if previous is not None and previous.name != f"ckpt-{step - 1:06d}" and world.is_main:
            previous = previous.rename(previous.with_name(previous.name + KEPT_SUFFIX))  # not deleted by the save
        world.barrier()
        checkpoint = save_checkpoint(arm_dir, step - 1, student, optimizer, state, metrics, world)
    else:  # the weights are lost: what is on disk stays the last good state
        checkpoint = previous
    good = (f"last good state: {checkpoint}" if checkpoint
            else "no checkpoint yet: the base student is the last good state")
    if world.is_main:
        write_nonfinite_record(
            arm_dir, recipe="train", arm=arm_name, step=step, quantity=quantity_of(message), what=message,
            checkpoint=str(checkpoint) if checkpoint else None,
            earlier_checkpoint=str(previous) if previous is not None and previous != checkpoint else None,
            checkpoint_max_abs_weight=largest_weight(student) if weights_finite else None,
        )
    raise NonFiniteError(f"{arm_name}: step {step}: {message}; training stopped, {good}; "
                         f"details in {arm_dir / 'nonfinite.json'}") from None
