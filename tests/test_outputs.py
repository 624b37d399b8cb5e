"""outputs.py: a unit of files is all old or all new, even when the run is killed while moving it in."""
import json
import os

import pytest

import outputs


def old_pair(folder):
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("old rows\n", encoding="utf-8")
    (folder / "eval.json").write_text('{"v": "old"}', encoding="utf-8")


def contents(folder):
    return {n: (folder / n).read_text(encoding="utf-8") for n in ("predictions.jsonl", "eval.json")}


def test_unit_replaces_both_files_and_leaves_no_temp(tmp_path):
    out = tmp_path / "run"
    old_pair(out)
    with outputs.unit(out, last=("eval.json",)) as tmp:
        outputs.atomic_write(os.path.join(tmp, "predictions.jsonl"), lambda p: open(p, "w").write("new rows\n"))
        outputs.atomic_write(os.path.join(tmp, "eval.json"), lambda p: open(p, "w").write('{"v": "new"}'))
    assert contents(out) == {"predictions.jsonl": "new rows\n", "eval.json": '{"v": "new"}'}
    assert sorted(os.listdir(out)) == ["eval.json", "predictions.jsonl"]


def test_a_failure_while_writing_moves_nothing(tmp_path):
    out = tmp_path / "run"
    old_pair(out)
    with pytest.raises(RuntimeError):
        with outputs.unit(out, last=("eval.json",)) as tmp:
            outputs.atomic_write(os.path.join(tmp, "predictions.jsonl"), lambda p: open(p, "w").write("new\n"))
            raise RuntimeError("killed while writing")
    assert contents(out)["predictions.jsonl"] == "old rows\n" and sorted(os.listdir(out)) == ["eval.json",
                                                                                               "predictions.jsonl"]


def test_a_move_that_fails_half_way_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """The first file is moved in, the second move fails: the folder holds a mix for now, and the unit's temp folder
    is kept; the next run's clean_stale finishes the moves, so the unit ends all new."""
    out = tmp_path / "run"
    old_pair(out)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("eval.json") and ".unit." not in str(dst):
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(outputs.WriteError):
        with outputs.unit(out, last=("eval.json",)) as tmp:
            outputs.atomic_write(os.path.join(tmp, "predictions.jsonl"), lambda p: open(p, "w").write("new rows\n"))
            outputs.atomic_write(os.path.join(tmp, "eval.json"), lambda p: open(p, "w").write('{"v": "new"}'))
    monkeypatch.setattr(os, "replace", real)
    assert contents(out) == {"predictions.jsonl": "new rows\n", "eval.json": '{"v": "old"}'}   # the mix, for now
    outputs.clean_stale(out, ("unit",))
    assert contents(out) == {"predictions.jsonl": "new rows\n", "eval.json": '{"v": "new"}'}
    assert sorted(os.listdir(out)) == ["eval.json", "predictions.jsonl"]


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_a_kill_between_the_moves_is_rolled_forward(tmp_path, moved):
    """What a SIGKILL between two os.replace calls leaves: the temp folder with its move list and the files not
    moved yet. The next run into the folder completes it (in the recorded order); without the list (killed while
    still writing) the temp folder is only removed and the old files stay."""
    out = tmp_path / "run"
    old_pair(out)
    tmp = out / ".unit.abcd1234.tmp"
    tmp.mkdir()
    new = {"predictions.jsonl": "new rows\n", "eval.json": '{"v": "new"}'}
    order = ["predictions.jsonl", "eval.json"]
    for n in order:
        (tmp / n).write_text(new[n], encoding="utf-8")
    (tmp / outputs.MOVES).write_text(json.dumps(order), encoding="utf-8")
    for n in order[:moved]:
        os.replace(tmp / n, out / n)
    outputs.clean_stale(out, ("unit",))
    assert contents(out) == new and not tmp.exists()


def test_a_unit_killed_while_writing_leaves_the_old_files(tmp_path):
    out = tmp_path / "run"
    old_pair(out)
    tmp = out / ".unit.abcd1234.tmp"
    tmp.mkdir()
    (tmp / "predictions.jsonl").write_text("half\n", encoding="utf-8")   # no move list: not all written
    outputs.clean_stale(out, ("unit",))
    assert contents(out)["predictions.jsonl"] == "old rows\n" and not tmp.exists()
