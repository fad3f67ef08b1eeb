"""Checkpoint bookkeeping: atomic finalize, ``latest``, rotation, and what a crash leaves."""

from __future__ import annotations

from chatft import checkpoint as ckpt


def test_checkpoint_finalize_latest_and_rotation(tmp_path):
    for step in (2, 4, 6):
        part = ckpt.partial_path(tmp_path, step)
        part.mkdir(parents=True)
        (part / "weights").write_text(str(step))
        ckpt.finalize(tmp_path, step, {"step": step}, limit=2)
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step-000004", "step-000006"]  # step-2 rotated out
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000006"
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path)) == {"step": 6}


def test_a_crash_mid_save_never_becomes_latest(tmp_path):
    part = ckpt.partial_path(tmp_path, 2)
    part.mkdir(parents=True)
    ckpt.finalize(tmp_path, 2, {"step": 2}, limit=3)
    # crash while writing step 4: the partial folder exists, nothing renamed, latest untouched
    crashed = ckpt.partial_path(tmp_path, 4)
    crashed.mkdir(parents=True)
    (crashed / "half-written").write_text("x")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    # a folder that looks final but lacks the marker (e.g. copied by hand) is not used either
    (ckpt.checkpoints_dir(tmp_path) / "step-000008").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    # a stale `latest` naming a deleted checkpoint falls back to the newest complete one
    (ckpt.checkpoints_dir(tmp_path) / "latest").write_text("step-000010\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    ckpt.clean_partials(tmp_path)
    assert not crashed.exists()


def _names(paths):
    return [p.name for p in paths]


def test_rotation_keeps_the_newest_and_the_protected_within_the_limit(tmp_path):
    ckpts = [tmp_path / ckpt.step_name(s) for s in (2, 4, 6, 8)]
    # no protection: the newest `limit`
    assert _names(ckpt.to_delete(ckpts, 2)) == ["step-000002", "step-000004"]
    # an old protected (best) one counts towards the limit: it and the newest stay
    assert _names(ckpt.to_delete(ckpts, 2, {tmp_path / "step-000002"})) == \
        ["step-000004", "step-000006"]
    # limit 1 with an older best keeps two (the newest is the resume point)
    assert _names(ckpt.to_delete(ckpts, 1, {ckpts[1]})) == ["step-000002", "step-000006"]
    # the protected one is the newest: nothing extra is kept
    assert _names(ckpt.to_delete(ckpts, 2, {ckpts[-1]})) == ["step-000002", "step-000004"]
    # protection is by name, whatever the path's spelling; unknown names are ignored
    assert _names(ckpt.to_delete(ckpts, 3, {tmp_path / "." / "step-000002", tmp_path / "x"})) == \
        ["step-000004"]
    assert ckpt.to_delete([], 2, {ckpts[0]}) == []


def test_finalize_never_rotates_out_a_protected_checkpoint(tmp_path):
    for step in (2, 4, 6):
        ckpt.partial_path(tmp_path, step).mkdir(parents=True)
        best = [ckpt.checkpoints_dir(tmp_path) / "step-000002"]
        ckpt.finalize(tmp_path, step, {"step": step}, limit=2, protected=best)
    assert _names(ckpt.complete_checkpoints(tmp_path)) == ["step-000002", "step-000006"]
