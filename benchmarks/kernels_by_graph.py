"""Inductor's GPU time of a profiled step by the compiled graph whose code defines each kernel, from saved files:
a `profile_gpu.py --top-kernels N` report and the same run's generated code (a `TORCH_LOGS=output_code` log, or
the `kernel_sources_*.py.gz` of `--kernel-sources`), plain or gzipped. BENCHMARKS.md section 1's per-layer-kind
figures (session 31) come from it.

    python benchmarks/kernels_by_graph.py REPORT CODE [--table 1] [--skip 4_forward,4_backward]

--table: which kernel list of the report (1: the first, LlamaThink's compiled step; 2: the first peer's);
--skip: graphs whose definitions do not count (a peer compiled in the same process defines kernels of the same
names). Prints milliseconds by graph (AOT ID: dynamo's compile order, forward / backward / inference) and their
sum: every inductor kernel of the list, also those the report's by-kind table puts elsewhere. The report's list
must hold every kernel (--top-kernels larger than their number) for the sum to be the step's.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_gpu import inductor_ms_by_graph, kernel_origins

_ROW = re.compile(r"^\s+([\d.]+)\s+(\d+)\s+(\S.*?)\s*$")


def read_text(path: str | Path) -> str:
    """The file's text, gunzipped where its name ends in .gz. Raises FileNotFoundError naming a missing file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.read()


def kernel_list(report: str, table: int = 1) -> list[tuple[str, float]]:
    """[(kernel name, ms)] of the `table`-th (from 1) "GPU kernels with the most time" list of a profile_gpu.py report.
    Raises ValueError where the report has fewer such lists."""
    lists, rows = 0, []
    for line in report.splitlines():
        if "GPU kernels with the most time" in line:
            lists += 1
            continue
        if lists == table:
            match = _ROW.match(line)
            if not match:
                if rows:
                    break
                continue
            rows.append((match.group(3), float(match.group(1))))
    if lists < table:
        raise ValueError(f"the report has {lists} kernel list(s), not {table} (profile_gpu.py --top-kernels N)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    parser.add_argument("code")
    parser.add_argument("--table", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma list of AOT IDs whose kernels do not count")
    args = parser.parse_args(argv)
    try:
        kernels = kernel_list(read_text(args.report), args.table)
        origins = kernel_origins([read_text(args.code)])
    except (OSError, ValueError) as err:
        parser.error(str(err))
    by_graph = inductor_ms_by_graph(kernels, origins, skip=tuple(filter(None, args.skip.split(","))))
    for graph, ms in sorted(by_graph.items()):
        print(f"  {graph:24s} {ms:8.3f}")
    print(f"  {'sum':24s} {sum(by_graph.values()):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
