"""``python -m fastnorm {demo,bench} ...`` and ``python -m fastnorm --version``.

Subcommands import their module only when chosen, so ``--version`` stays instant.
"""
import argparse
import importlib
import sys

from . import __version__

# subcommand -> (module, help); each module has ``main(argv) -> int``
COMMANDS = {
    "demo": ("fastnorm.demo", "train small NumPy networks with and without normalization"),
    "bench": ("fastnorm._bench", "time every op against NumPy and PyTorch, with GB/s"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m fastnorm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(COMMANDS[args.command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
