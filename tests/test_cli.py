import subprocess
import sys

import fmrt
from fmrt.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_version_and_console_script():
    out = subprocess.run([sys.executable, "-m", "fmrt.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert fmrt.__version__ in out


def test_info(capsys):
    assert main(["info"]) == 0
    assert "FMRT_BACKEND" in capsys.readouterr().out
