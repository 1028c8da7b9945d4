"""Small helpers that vLLM's scripts import from `vllm.utils`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def dash_option(arg: str) -> str:
    """`--max_model_len=8` -> `--max-model-len=8`: underscores in a long option's name become
    dashes; the value after `=`, short options and positional arguments are left alone."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` that, as vLLM's does, takes long options spelled with underscores as
    well as dashes (`--model_type x` is `--model-type x`), besides argparse's `--opt=value`.

    Declare options with dashes; everything after a bare `--` is passed through unchanged.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[Any]]:
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        dashed = [dash_option(arg) for arg in args[:end]] + args[end:]
        return super().parse_known_args(dashed, namespace)
