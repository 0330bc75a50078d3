"""Plot training-loss curves of several runs side by side (e.g. the stage-1 ablation in README).

    python -m training.plot_runs --output assets/ablation.png \\
        "with stage 1=runs/ablation/with/stage2,runs/ablation/with/vqa" "without stage 1=runs/ablation/without/stage2,runs/ablation/without/vqa"

Each argument is ``LABEL=RUN[,RUN...]``: the runs' ``metrics.csv`` curves are laid end to end (stage 2, then the
fine-tune), one panel per phase.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_curve(run: Path) -> tuple[list[int], list[float]]:
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def plot(series: dict[str, list[Path]], output: Path, titles: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = max(len(runs) for runs in series.values())
    fig, axes = plt.subplots(1, phases, figsize=(5 * phases, 3.6), squeeze=False)
    for label, runs in series.items():
        for phase, run in enumerate(runs):
            steps, losses = read_curve(run)
            axes[0][phase].plot(steps, losses, label=label)
    for phase, ax in enumerate(axes[0]):
        ax.set_title(titles[phase] if titles and phase < len(titles) else f"phase {phase + 1}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", help="LABEL=RUN[,RUN...]")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--titles", help="comma-separated panel titles, e.g. 'stage 2,VQA fine-tune'")
    args = parser.parse_args(argv)
    series = {}
    for item in args.series:
        label, sep, runs = item.partition("=")
        if not sep:
            parser.error(f"{item!r} is not LABEL=RUN[,RUN...]")
        series[label] = [Path(r) for r in runs.split(",")]
    print(plot(series, args.output, args.titles.split(",") if args.titles else None))


if __name__ == "__main__":
    main()
