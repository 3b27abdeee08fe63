"""The kernels install as fastpeft.kernels, never as a top-level `kernels` (Hugging Face's `kernels`
distribution owns that name)."""
import importlib.metadata


def test_only_fastpeft_is_a_top_level_package():
    top = importlib.metadata.distribution("fastpeft").read_text("top_level.txt").split()
    assert top == ["fastpeft"], f"fastpeft installs top-level packages {top}"


def test_kernels_import_as_a_subpackage():
    import fastpeft.kernels.lora as lora

    assert lora.__name__ == "fastpeft.kernels.lora"
