"""The pasa command line: subcommands parse, dispatch and fail cleanly."""

import pytest

from pasa.cli import main


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend reference  available" in out and "fa4" in out


def test_attention_demo_prints_a_table(capsys, tmp_path):
    path = tmp_path / "demo.json"
    argv = ["attention-demo", "--grid", "2", "16", "16", "--layers", "1", "--no-progress"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| PASA |" in out and "| mean-pool top-k |" in out and path.is_file()


def test_demo_with_a_missing_checkpoint_fails_with_a_clear_message(capsys, tmp_path):
    code = main(["demo", "--checkpoint", str(tmp_path / "none.safetensors"), "--no-progress"])
    assert code == 2
    assert "pasa demo:" in capsys.readouterr().err


def test_forwarded_subcommands_reach_their_own_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["probe", "--help"])
    assert exc.value.code == 0
    assert "checkpoint" in capsys.readouterr().out
