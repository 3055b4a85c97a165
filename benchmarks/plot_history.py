"""Plot training/validation loss curves from history.json files of pretraining and finetuning runs.

python benchmarks/plot_history.py OUT.png LABEL=history.json [LABEL=history.json ...] [--title T]
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/history.json")
    parser.add_argument("--title", default="")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window of the training loss")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, spec in enumerate(args.runs):
        label, _, path = spec.partition("=")
        history = json.load(open(path))
        steps = sorted(int(s) for s in history["losses"])
        losses = [history["losses"][str(s)] for s in steps]
        w = max(1, args.smooth)
        smooth = [
            sum(losses[max(0, j - w + 1) : j + 1]) / len(losses[max(0, j - w + 1) : j + 1]) for j in range(len(losses))
        ]
        color = f"C{i}"
        ax.plot(steps, smooth, color=color, alpha=0.8, label=f"{label} train (avg of {w})")
        ev = sorted((int(s), v) for s, v in history["eval"].items())
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o--", color=color, label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(8, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
