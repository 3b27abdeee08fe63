"""The ``fastpeft`` command (also ``python -m fastpeft``).

    fastpeft demo [flags]   train LoRA on a small built-in Llama-shaped model: fastpeft vs reference vs PEFT
    fastpeft env            versions, device and backend, for bug reports
    fastpeft --version      fastpeft's version
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

from . import __version__


def _number(kind, ok, expected: str):
    """An argparse type: parse ``text`` with ``kind`` and check it with ``ok``; errors say what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_dropout = _number(float, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")
_positive_float = _number(float, lambda v: v > 0.0, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULTS

    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: fused Triton kernels for LoRA training on Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"fastpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    demo = sub.add_parser(
        "demo",
        help="train LoRA on a small built-in Llama-shaped model: fastpeft vs reference vs PEFT",
        description=(
            "Build a small Llama-shaped model from a config (random frozen weights, byte-level tokens, "
            "nothing downloaded), train LoRA adapters on a built-in text with fastpeft, the reference "
            "path and PEFT from the same initial weights, check that the losses agree, print step time, "
            "tokens/s and peak memory, and save the adapter in PEFT's format. Exits 1 if a check fails."
        ),
    )
    def size(key):
        return f"default: {DEFAULTS['cpu'][key]} on CPU, {DEFAULTS['cuda'][key]} on CUDA"

    demo.add_argument("--hidden", type=_positive_int, help=f"hidden size ({size('hidden')})")
    demo.add_argument("--layers", type=_positive_int, help=f"decoder layers ({size('layers')})")
    demo.add_argument("--heads", type=_positive_int, help=f"attention heads ({size('heads')})")
    demo.add_argument("--seq-len", type=_positive_int, help=f"tokens per sequence ({size('seq_len')})")
    demo.add_argument("--batch", type=_positive_int, help=f"sequences per step ({size('batch')})")
    demo.add_argument("--steps", type=_positive_int, help=f"training steps ({size('steps')})")
    demo.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r; lora_alpha = 2r (default: 8)")
    demo.add_argument("--dropout", type=_dropout, default=0.0,
                      help="LoRA dropout (default: 0; with dropout > 0 only PEFT's first-step loss is compared, "
                           "since PEFT's dropout masks differ from fastpeft's)")
    demo.add_argument("--lr", type=_positive_float, default=1e-2, help="AdamW learning rate (default: 0.01)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="auto = cuda when available, else cpu (default: auto)")
    demo.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                      help="model dtype; auto = bfloat16 on CUDA, float32 on CPU (default: auto)")
    demo.add_argument("--output-dir", default="./fastpeft-demo-adapter",
                      help="where the trained adapter is saved, created if missing and checked before training "
                           "(default: ./fastpeft-demo-adapter)")
    demo.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison even when peft is installed")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights, adapters, data and dropout (default: 0)")
    demo.set_defaults(func=_demo, parser=demo)

    env = sub.add_parser("env", help="print versions, device and backend (for bug reports)")
    env.set_defaults(func=_env, parser=env)
    return parser


def _resolve_demo_args(args, parser: argparse.ArgumentParser):
    """Fill the device-dependent defaults and check what argparse cannot check flag by flag."""
    import torch

    from .demo import DEFAULTS

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda was asked for but torch {torch.__version__} sees no CUDA device")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    if (args.hidden // args.heads) % 2:
        parser.error(f"the head size --hidden/--heads = {args.hidden // args.heads} must be even (rotary embeddings)")
    if args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2 to have a next token to predict, got {args.seq_len}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    args.intermediate = 16 * math.ceil(2.75 * args.hidden / 16)  # Llama's ~2.7x, a multiple of 16
    args.output_dir = _writable_dir(args.output_dir, parser)
    return args


def _writable_dir(path: str, parser: argparse.ArgumentParser) -> str:
    """``path`` made absolute, created if missing and probed with a temporary file, before any training."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"argument --output-dir: expected a directory, got the file {path}")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        parser.error(f"argument --output-dir: cannot write the adapter to {path}: {err.strerror or err}")
    return path


def _demo(args) -> int:
    from .demo import known_noise_hidden, run_demo

    args = _resolve_demo_args(args, args.parser)
    with known_noise_hidden():
        return run_demo(args)


def _env(args) -> int:
    import platform

    import torch

    from .backend import backend_name

    print(f"fastpeft     {_version('fastpeft')}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "kernels", "numpy"):
        print(f"{name:<12} {_version(name)}")
    if torch.cuda.is_available():
        print(f"device       cuda: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("device       cpu (no CUDA device)")
    print(f"backend      {backend_name()} (auto: kernels on CUDA tensors, reference elsewhere; FASTPEFT_BACKEND seeds it)")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
