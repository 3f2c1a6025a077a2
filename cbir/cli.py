"""`cbir <command> [overrides]`: run (default), report, search, bench, export, parity. Same as `python -m cbir.<command>`."""

from __future__ import annotations

import sys


def main() -> None:
    commands = {"run": "cbir.run", "report": "cbir.report", "search": "cbir.search", "bench": "cbir.bench",
                "export": "cbir.export", "parity": "cbir.parity"}
    args = sys.argv[1:]
    name = args.pop(0) if args and args[0] in commands else "run"
    sys.argv = [f"cbir {name}", *args]
    module = __import__(commands[name], fromlist=["main"])
    module.main()


if __name__ == "__main__":
    main()
