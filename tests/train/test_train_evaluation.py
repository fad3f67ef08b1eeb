"""Evaluation bookkeeping (chatft.train.evaluation): when steps evaluate, which checkpoint is the
best, early stopping with Hugging Face's semantics, the export's reason, the saved record."""

from __future__ import annotations

import json

from chatft.train.evaluation import History, due


def run(losses: list[float], patience: int = 0, threshold: float = 0.0,
        checkpointed: set[int] | None = None) -> tuple[History, int | None]:
    """Evaluations at steps 10, 20, ... of ``losses`` (after a baseline at step 0); returns the
    history and the step where early stopping stopped (None: it did not)."""
    h = History(patience, threshold)
    h.add(0, 0.0, 9.0, checkpoint=False)
    for k, loss in enumerate(losses, start=1):
        step = 10 * k
        h.add(step, float(k), loss, checkpoint=checkpointed is None or step in checkpointed)
        if h.should_stop:
            return h, step
    return h, None


def test_due_on_steps_and_epoch_boundaries():
    assert [d for d in range(1, 13) if due("epoch", 0, d, 4)] == [4, 8, 12]
    assert [d for d in range(1, 13) if due("steps", 5, d, 4)] == [5, 10]
    assert not any(due("no", 1, d, 1) for d in range(1, 5))


def test_the_best_is_the_lowest_checkpointed_evaluation_never_the_baseline():
    h, _ = run([4.2, 4.09, 4.12, 4.43])
    assert (h.best.step, h.best.eval_loss) == (20, 4.09)
    h, _ = run([4.2, 4.09, 4.09])  # a tie: the earlier checkpoint
    assert h.best.step == 20
    h, _ = run([4.2, 4.09, 4.3], checkpointed={10, 30})  # no checkpoint of step 20
    assert h.best.step == 10
    h, _ = run([9.5, 9.9])  # worse than the base model: still a trained checkpoint
    assert h.best.step == 10 and h.baseline.eval_loss == 9.0
    h, stop = run([float("nan"), 4.2, float("nan")], patience=2)  # a diverged evaluation
    assert h.best.step == 20 and stop is None and h.bad_evaluations == 1


def test_early_stopping_counts_evaluations_without_improvement_in_a_row():
    # patience 2: 4.0 is the best; 4.1 (1), 3.9 improves (0), 3.95 (1), 4.2 (2) -> stop at 50
    h, stop = run([4.0, 4.1, 3.9, 3.95, 4.2, 3.0], patience=2)
    assert stop == 50 and h.bad_evaluations == 2 and h.best.step == 30
    # the threshold: 3.95 beats 4.0 by 0.05, not more than 0.1, so it counts as no improvement
    _, stop = run([4.0, 3.95, 3.5, 3.45, 3.44], patience=2, threshold=0.1)
    assert stop == 50
    _, stop = run([4.0, 3.95, 3.5], patience=2, threshold=0.01)
    assert stop is None
    _, stop = run([4.0, 5.0, 6.0, 7.0])  # patience 0: never
    assert stop is None


def test_the_export_choice_says_which_step_and_why():
    h, _ = run([4.2, 4.0902, 4.12])
    assert h.export_choice(30, 3.0, load_best=True) == (
        20, "step 20 (epoch 2): lowest eval_loss 4.0902 of 3 evaluations")
    step, why = h.export_choice(30, 3.0, load_best=False)
    assert step == 30 and why == ("the last step 30 (epoch 3): eval_loss 4.1200; the lowest was "
                                  "4.0902 at step 20 (load_best_model_at_end is off)")
    h, _ = run([9.5, 9.9])
    step, why = h.export_choice(20, 2.0, load_best=True)
    assert step == 10 and why.endswith("note: the model before training scored 9.0000, not worse")
    empty = History()
    assert empty.export_choice(7, 0.5, load_best=True) == (
        7, "the last step 7 (epoch 0.5); no evaluated checkpoint to choose from")


def test_the_record_survives_a_checkpoint_round_trip():
    h, _ = run([4.0, 4.1], patience=3, checkpointed={20})
    saved = json.loads(json.dumps(h.to_dict()))
    assert saved["best_metric"] == 4.1 and saved["best_global_step"] == 20
    back = History.from_dict(saved, patience=3, threshold=0.0)
    assert back == h
    back.add(30, 3.0, 4.5, checkpoint=True)
    assert back.bad_evaluations == 2 and back.best.step == 20
    assert History.from_dict(None, 1, 0.0) == History(1, 0.0)  # a checkpoint from before
