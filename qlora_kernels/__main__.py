"""python -m qlora_kernels {validate,compile-check,demo,bench}."""

from __future__ import annotations

import sys

COMMANDS = {
    "validate": "every op of every available backend against the reference, as a table",
    "compile-check": "compile every Triton kernel config for sm_80/sm_90 here; fail on errors or spills",
}


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
    if command == "validate":
        from .validate import main as run, prepare_environment

        prepare_environment()
        return run(rest)
    if command == "compile-check":
        from .compile_check import main as run

        return run(rest)
    print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
