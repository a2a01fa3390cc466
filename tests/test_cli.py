"""The command line front end: user mistakes end in one clear line, never a traceback."""
import importlib.util

import pytest

from minivl_cli.cli import main


@pytest.mark.parametrize("argv", [["chat", "--backend", "torch", "hi"], ["perplexity", "--backend", "torch", "x.txt"]],
                         ids=["chat", "perplexity"])
def test_torch_backend_without_torch_names_the_cpu_wheel(argv, tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    (tmp_path / "x.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)
    assert main([*argv[:-1], "--model-dir", str(tmp_path), argv[-1]]) == 4   # backend not available here
    err = capsys.readouterr().err
    assert "DeviceError" in err and "needs torch" in err and "torch==2.13.0" in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "describe-image" in capsys.readouterr().out
