import subprocess
import sys


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "megatiny", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "megatiny" in out


def test_public_names_import():
    import megatiny.parallel.parallelize  # noqa: F401 - the submodule must not shadow the function
    from megatiny.parallel import ParallelContext, parallelize

    assert callable(parallelize) and not isinstance(parallelize, type(megatiny))
    assert ParallelContext.__name__ == "ParallelContext"
