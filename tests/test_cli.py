"""The ``fastpeft`` command: the demo end to end (as a user runs it), its help, and its errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastpeft.cli import main

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch", "2", "--steps", "6"]


def _run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastpeft", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _assert_adapter_dir(path):
    assert (path / "adapter_model.safetensors").is_file(), f"no adapter_model.safetensors in {sorted(os.listdir(path))}"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4


def test_demo_runs_and_passes(tmp_path):
    out = tmp_path / "adapter"
    proc = _run("demo", *TINY, "--rank", "4", "--device", "cpu", "--output-dir", str(out))
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "PASS", proc.stdout
    assert "FAIL" not in proc.stdout, proc.stdout
    assert "| fastpeft" in proc.stdout and "step ms (median)" in proc.stdout, proc.stdout
    if importlib.util.find_spec("peft") is not None:
        assert "| PEFT" in proc.stdout and "fastpeft vs PEFT: loss curve, first 5 steps" in proc.stdout, proc.stdout
    assert str(out) in proc.stdout
    _assert_adapter_dir(out)
    # the first lines a user sees are the demo's: known third-party noise (bitsandbytes' kernel fetch
    # at peft's import, transformers' deprecation warnings) is hidden; stderr holds the progress bars
    assert lines[0].startswith("fastpeft demo: LlamaForCausalLM"), proc.stdout
    for noise in ("kernels-community", "Warning", "warn("):
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_known_noise_hidden_inside_the_demo_only(caplog):
    import logging
    import warnings

    from fastpeft.demo import KNOWN_NOISE_LOGS, KNOWN_NOISE_WARNINGS, known_noise_hidden

    (logger_name, prefix), = KNOWN_NOISE_LOGS.items()
    logger = logging.getLogger(logger_name)
    (category, text), = KNOWN_NOISE_WARNINGS  # (a regex that is also the text)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with known_noise_hidden():
            logger.warning(prefix + ": inside")
            logger.warning("another bitsandbytes message: inside")
            warnings.warn(text + " inside", category)
            warnings.warn("another FutureWarning: inside", FutureWarning)
        logger.warning(prefix + ": after")
        warnings.warn(text + " after", category)
    assert [r.getMessage() for r in caplog.records] == [
        "another bitsandbytes message: inside", prefix + ": after"]
    assert [str(w.message) for w in caught] == ["another FutureWarning: inside", text + " after"]


def test_version(capsys):
    import fastpeft

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"fastpeft {fastpeft.__version__}\n"


@pytest.mark.parametrize("case", ["file", "under-a-file", "unwritable"])
def test_output_dir_checked_before_training(case, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    path, message = {
        "file": (a_file, f"argument --output-dir: expected a directory, got the file {a_file}"),
        "under-a-file": (a_file / "sub", f"argument --output-dir: cannot write the adapter to {a_file / 'sub'}: "
                                         f"Not a directory"),
        "unwritable": (tmp_path / "out", f"argument --output-dir: cannot write the adapter to {tmp_path / 'out'}: "
                                         f"Permission denied"),
    }[case]
    if case == "unwritable":  # (chmod does not stop root, who may run the tests)
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit) as exc:
        main(["demo", *TINY, "--device", "cpu", "--output-dir", str(path)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert "fastpeft demo: LlamaForCausalLM" not in captured.out  # nothing was trained


def _interpreter_broken() -> bool:
    """triton 3.6's interpreter turns scalar kernel arguments into 1-element arrays and calls int()
    on them in range(); NumPy >= 2.3 refuses that (seen on the GPU machine: triton 3.6, NumPy 2.4)."""
    import numpy
    import triton

    try:
        int(numpy.array([1]))
        return False
    except TypeError:
        return tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)


@pytest.mark.interpreter
@pytest.mark.skipif(_interpreter_broken(), reason="this triton's interpreter cannot run with this NumPy")
def test_demo_kernels_under_interpreter_match_reference(tmp_path):
    """FASTPEFT_BACKEND=triton + TRITON_INTERPRET=1: the fused kernels train the model on CPU, and
    the demo compares their loss curve with the reference path's (dropout on: same Philox masks)."""
    out = tmp_path / "adapter"
    tiny = ["--hidden", "16", "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch", "2", "--steps", "3"]
    proc = _run("demo", *tiny, "--rank", "4", "--dropout", "0.1", "--device", "cpu", "--no-peft",
                "--output-dir", str(out), env={"FASTPEFT_BACKEND": "triton", "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "fastpeft backend: triton (interpreter)" in proc.stdout, proc.stdout
    assert "PASS  fastpeft vs reference: loss curve, first 3 steps" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "PASS"
    _assert_adapter_dir(out)


def test_help_lists_commands():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "env" in proc.stdout and "--version" in proc.stdout


def test_demo_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--hidden", "--layers", "--heads", "--seq-len", "--batch", "--steps", "--rank", "--dropout",
                 "--device", "--dtype", "--output-dir", "--no-peft", "--seed"):
        assert flag in text, f"{flag} missing from `fastpeft demo --help`"


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: fastpeft" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--rank", "0"], "argument --rank: expected a positive integer, got 0"),
        (["demo", "--steps", "two"], "argument --steps: expected a positive integer, got 'two'"),
        (["demo", "--dropout", "1.5"], "argument --dropout: expected a probability in [0, 1), got 1.5"),
        (["demo", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["demo", "--hidden", "30", "--heads", "4"], "--hidden 30 must be a multiple of --heads 4"),
        (["demo", "--hidden", "12", "--heads", "4"], "head size --hidden/--heads = 3 must be even"),
        (["demo", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
    ids=["unknown-flag", "rank-0", "steps-not-int", "dropout-1.5", "dtype", "device", "hidden-vs-heads",
         "odd-head-size", "seq-len-1", "unknown-command"],
)
def test_bad_flags_give_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda was asked for but torch" in capsys.readouterr().err
