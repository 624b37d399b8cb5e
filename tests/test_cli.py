"""cli.py itself: cli.number as an argparse type (exact one-line messages), cli.ArgumentParser's one-line errors,
cli.at_end hooks around cli.run, and cli.input_file's refusals. The scripts' whole contract: tests/test_errors.py."""
import os

import pytest

import cli


def parse_error(capsys, type_, value, flag="--x"):
    """The stderr of cli.ArgumentParser refusing `flag value` (type_), which must exit 2."""
    p = cli.ArgumentParser(prog="t")
    p.add_argument(flag, type=type_)
    with pytest.raises(SystemExit) as e:
        p.parse_args([f"{flag}={value}"])   # "=": argparse reads a lone "-inf" as a flag
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("kind,bounds,value,message", [
    (float, {}, "nan", "'nan' is not a finite number"),
    (float, {}, "inf", "'inf' is not a finite number"),
    (float, {}, "-inf", "'-inf' is not a finite number"),
    (float, {}, "1e999", "'1e999' is not a finite number"),
    (float, {}, "1e39", "1e39 is too large (the limit is 3.40282e+38, the largest float32)"),
    (float, {}, "abc", "'abc' is not a number"),
    (float, dict(lo=0), "-1", "-1 must be >= 0"),
    (float, dict(lo=0, lo_open=True), "0", "0 must be > 0"),
    (float, dict(lo=0, hi=1, hi_open=True), "1", "1 must be >= 0 and < 1"),
    (float, dict(lo=0, hi=1), "1.5", "1.5 must be >= 0 and <= 1"),
    (int, dict(lo=1), "0", "0 must be >= 1"),
    (int, dict(lo=1, hi=4294967296), "4294967297", "4294967297 must be >= 1 and <= 4294967296"),
    (int, {}, "2.5", "'2.5' is not an integer"),
    (int, {}, "9" * 40, "9" * 30 + "... is too large (the limit is 2**63 - 1)"),
])
def test_number_refuses_with_the_exact_argparse_message(capsys, kind, bounds, value, message):
    assert parse_error(capsys, cli.number(kind, **bounds), value, "--lr") == f"error: argument --lr: {message}\n"


@pytest.mark.parametrize("kind,bounds,value,want", [
    (float, dict(lo=0), "0", 0.0), (float, dict(lo=0, hi=1, hi_open=True), "0.999", 0.999),
    (float, {}, "-3.4e38", -3.4e38), (int, dict(lo=1), "7", 7), (int, {}, str(2 ** 63 - 1), 2 ** 63 - 1)])
def test_number_accepts_the_edges(kind, bounds, value, want):
    v = cli.number(kind, **bounds)(value)
    assert v == want and type(v) is kind


def test_argument_parser_error_is_one_line_without_usage(capsys):
    p = cli.ArgumentParser(prog="t")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--m", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "usage" not in err, err


@pytest.fixture
def hooks(monkeypatch):
    """A fresh cli._AT_END (outputs registers its own hook there at import)."""
    monkeypatch.setattr(cli, "_AT_END", [])
    calls = []
    return calls, (lambda: calls.append("a")), (lambda: calls.append("b"))


def test_at_end_hooks_run_once_per_run_in_order_deduplicated(hooks):
    calls, a, b = hooks
    for fn in (a, b, a, b, a):
        cli.at_end(fn)
    assert cli._AT_END == [a, b]
    assert cli.run(lambda argv: calls.append(f"main {argv}") or "done", ["x"]) == "done"
    assert calls == ["main ['x']", "a", "b"]
    cli.run(lambda argv: None, [])
    assert calls == ["main ['x']", "a", "b", "a", "b"]


@pytest.mark.parametrize("raised,code", [(cli.UserError("--data", "bad"), 2), (KeyboardInterrupt(), 130)])
def test_at_end_hooks_run_when_main_fails(hooks, capsys, raised, code):
    calls, a, b = hooks
    cli.at_end(b)
    cli.at_end(a)

    def main(argv):
        raise raised
    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert e.value.code == code and calls == ["b", "a"]
    assert capsys.readouterr().err.count("\n") == 1


def test_input_file_refuses_a_directory_a_fifo_and_a_missing_path(tmp_path):
    with pytest.raises(cli.UserError) as e:
        cli.input_file(str(tmp_path), "--data")
    assert str(e.value) == f"--data: {tmp_path}: is a directory, not a file"
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(cli.UserError) as e:
        cli.input_file(fifo, "--data")
    assert str(e.value) == f"--data: {fifo}: not a regular file (a FIFO, device or socket): give a file"
    with pytest.raises(cli.UserError) as e:
        cli.input_file(str(tmp_path / "nope.jsonl"), "--data")
    assert str(e.value) == f"--data: {tmp_path / 'nope.jsonl'}: no such file"
    ok = tmp_path / "ok.jsonl"
    ok.write_text("{}\n", encoding="utf-8")
    assert cli.input_file(str(ok), "--data") == str(ok)
