"""python -m qlora_kernels {validate,compile-check,demo,bench}."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "validate": "every op of every available backend against the reference, as a table",
    "compile-check": "compile every Triton kernel config for sm_80/sm_90 here; fail on errors or spills",
    "demo": "QLoRA fine-tune of a real model (MiniLM-L6) vs bf16 LoRA on a shipped task",
    "bench": "microbenchmarks against dense BF16, the unfused chain and bitsandbytes",
}

# command -> module whose main(argv) -> int runs it; imported only when asked for.
MODULES = {"validate": "validate", "compile-check": "compile_check", "demo": "demo", "bench": "bench"}


def _usage() -> str:
    lines = ["usage: python -m qlora_kernels COMMAND [options]", "", "commands:"]
    lines += [f"  {name:15s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in MODULES:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command != "compile-check":
        # Without a GPU the Triton kernels run only under the interpreter, which must be chosen
        # before any kernel is defined. (compile-check needs the opposite and handles it itself.)
        from .validate import prepare_environment

        prepare_environment()
    module = importlib.import_module(f"{__package__}.{MODULES[command]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
