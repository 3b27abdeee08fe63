"""The kernels install as fastpeft.kernels, never as a top-level `kernels` (Hugging Face's `kernels`
distribution owns that name)."""
import importlib.metadata


def test_only_fastpeft_is_a_top_level_package():
    top = importlib.metadata.distribution("fastpeft").read_text("top_level.txt").split()
    assert top == ["fastpeft"], f"fastpeft installs top-level packages {top}"


def test_kernels_import_as_a_subpackage():
    import fastpeft.kernels.linear as linear

    assert linear.__name__ == "fastpeft.kernels.linear"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

_FROM_ROOT = r"""
import os, sys
root = {root!r}
assert os.path.abspath(sys.path[0] or os.curdir) == root, sys.path[:3]
import transformers.activations  # transformers >= 5.25 imports Hugging Face's `kernels` here
from transformers import LlamaConfig  # (older ones look it up, and failed on the folder's name)
import fastpeft, fastpeft.kernels.linear
import kernels
if getattr(kernels, "__file__", None) is None:  # Hugging Face's is not installed: an empty namespace,
    assert not hasattr(kernels, "__version__") and list(kernels.__path__) == []  # which transformers skips
    print("kernels: absent")
else:
    print("kernels:", kernels.__file__)
    ours = os.path.join(root, "kernels") + os.sep  # (a venv inside the checkout is fine)
    assert not os.path.abspath(kernels.__file__).startswith(ours), kernels.__file__
from transformers.utils import import_utils
print("transformers sees kernels:", import_utils.is_kernels_available())
"""


def test_repository_root_does_not_shadow_hugging_face_kernels():
    """Python started in the checkout (python -m, python -m pytest, a notebook) has the root first on
    sys.path, where our kernels/ folder would take the name of Hugging Face's `kernels`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FROM_ROOT.format(root=str(ROOT))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels:" in proc.stdout, proc.stdout
