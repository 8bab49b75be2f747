"""Bad command lines fail fast with a clear ``jaxquant CMD: error:`` and exit code 2,
before any long work (calibration, curves, tuning) starts."""

from __future__ import annotations

import pytest

from jaxquant import cli


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if a command gets as far as calibrating."""
    def refuse(*a, **k):
        raise AssertionError("the command calibrated before checking its arguments")

    monkeypatch.setattr(cli, "_load_or_calibrate", refuse)


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxquant {argv[0]}: error:") and "Traceback" not in err
    return err


def test_calibrate_refuses_zero_groups(model_dir, tmp_path, capsys):
    err = _error(capsys, ["calibrate", str(model_dir), "--groups", "0", "--out", str(tmp_path / "c")])
    assert "groups must be positive, got 0" in err and "--groups" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--method", "aq", "--w-bits", "0.1"], "infeasible"),
    (["--method", "aq", "--w-bits", "-2"], "positive number"),
    (["--method", "rd", "--w-bits", "0.1", "--a-bits", "8"], "0.1 weight bits is outside the candidates' widths 2..8"),
    (["--method", "rd", "--w-bits", "4", "--a-bits", "20"], "20 activation bits is outside"),
    (["--method", "rd", "--w-bits", "3", "--a-bits", "8", "--rd-min-w-bits", "4"], "widths 4..8"),
])
def test_quantize_refuses_budgets_it_cannot_meet_before_calibrating(model_dir, tmp_path, capsys, no_calibration,
                                                                     extra, needle):
    err = _error(capsys, ["quantize", str(model_dir), *extra, "--out", str(tmp_path / "q")])
    assert needle in err, err


@pytest.mark.parametrize("cmd", ["finetune", "bias-correct"])
def test_refinement_refuses_a_float_model(model_dir, tmp_path, capsys, cmd):
    err = _error(capsys, [cmd, str(model_dir), "--calib", str(tmp_path / "none"), "--float", str(model_dir),
                          "--out", str(tmp_path / "out")])
    assert "is a float model" in err and "jaxquant quantize" in err


def test_eval_names_a_file_that_is_not_an_npz(tmp_path, capsys):
    bad = tmp_path / "s.npz"
    bad.write_text("hello world\n")
    err = _error(capsys, ["eval", str(bad), "--ref", "fashion-mnist-test", "--features", "fmnist"])
    assert "is not an .npz archive" in err and "np.savez" in err and "allow_pickle" not in err
