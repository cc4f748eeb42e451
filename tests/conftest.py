"""Session-wide settings for the tests' subprocesses."""

import os
import sys

import pytest

# Every launched script (torchrun, launch/*.sh, sbatch and srun jobs, which inherit this
# environment) finds `python` and `torchrun` beside the interpreter running the tests, whether or
# not its venv is activated. Not resolved: a venv's bin/python is a link out of the venv.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory):
    """DeepSpeed compiles small CPU extensions (its shared-memory comm op, CPU Adam) on first use:
    into this session's temp dir, once for all tests, never into the user's cache."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    return os.environ["TORCH_EXTENSIONS_DIR"]


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory):
    """The trainer's token cache (and that of every trainer subprocess): this session's temp dir,
    never the user's ~/.cache."""
    os.environ["CONTRASTIVE_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    return os.environ["CONTRASTIVE_TRAINER_CACHE"]
