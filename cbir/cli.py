"""`cbir <command> [overrides]`: the same as `python -m cbir.<command> [overrides]`.

`cbir` alone, or followed by overrides (`cbir -m encoder=baseline,random`), is `cbir run`.
"""

from __future__ import annotations

import sys

# command: (module, one line for `cbir --help`)
COMMANDS = {
    "run": ("cbir.run", "one benchmark job, or a sweep with -m (encoder x dataset x index, modified P@N)"),
    "report": ("cbir.report.from_runs", "tables from the runs in MLflow (Table 1 layout, per modality, saturation)"),
    "search": ("cbir.search", "query a saved index with your own images (gallery of the nearest ones)"),
    "bench": ("cbir.bench", "speed and memory benchmark of extraction, index and search"),
    "prepare": ("cbir.data.prepare", "build or refresh a dataset's manifest and print what it holds"),
    "export": ("cbir.export", "write a cache entry and its manifest in the study's CSV + HDF5 formats"),
    "parity": ("cbir.parity", "compare cbir's embeddings with published ones (cosine per row, verdict)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cbir [command] [hydra overrides]   (no command: run)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "  cbir <command> --help   the command's settings (Hydra config groups and keys)",
        "  cbir --version          cbir's version",
        "",
        "examples:",
        "  cbir -m experiment=smoke            a one-minute sweep on synthetic data",
        "  cbir encoder=resnet50 index.per_class=100",
        "  cbir report report.runs=latest_sweep",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    first = args[0] if args else None
    if first in ("-h", "--help", "help"):
        print(usage())
        return
    if first in ("-V", "--version", "version"):
        from cbir import __version__

        print(f"cbir {__version__}")
        return
    if first in COMMANDS:
        name = args.pop(0)
    elif first is None or first.startswith("-") or "=" in first:
        name = "run"  # overrides or Hydra flags (-m, --cfg job, ...) for the default command
    else:
        print(f"cbir: unknown command '{first}'; commands: {', '.join(COMMANDS)} (cbir --help)", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"cbir {name}", *args]
    module = __import__(COMMANDS[name][0], fromlist=["main"])
    module.main()


if __name__ == "__main__":
    main()
