#!/usr/bin/env python3
"""The task-accuracy experiment's table and plots, from what run.sh wrote under WORK:
eval-sampled*/ and eval-greedy*/ (distill eval reports; several directories of each kind are
merged by model label), times.tsv (wall-clock milliseconds per stage and arm).

    python3 experiments/arith-r1/report.py experiments/arith-r1/work

writes WORK/results.md (the table) and, where matplotlib is installed, WORK/accuracy.png
(pass@1 per level and arm) and WORK/compute.png (middle-level pass@1 against training time).
Arms are the labels `<arm>-s<seed>`; their seeds are averaged, and each seed is also listed.
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

MIDDLE = "L3"
ARMS = ["sft", "kd", "on-policy", "kd-then-on-policy"]
# An arm's training time includes the runs it starts from.
STARTS_FROM = {"kd-then-on-policy": "kd-half"}


def level(task: str) -> str:
    return task.rsplit("-", 1)[-1]


def load_reports(work: Path, kind: str) -> dict:
    """label -> level -> task report, merged over WORK/eval-<kind>*/report.json."""
    models = {}
    for path in sorted(work.glob(f"eval-{kind}*/report.json")):
        for m in json.loads(path.read_text())["models"]:
            models[m["label"]] = {level(t["task"]): t for t in m["tasks"]}
    return models


def truncation(work: Path, kind: str) -> dict:
    """(label, level) -> share of outputs cut at max_new_tokens."""
    counts = defaultdict(lambda: [0, 0])
    for path in sorted(work.glob(f"eval-{kind}*/examples.jsonl")):
        for line in path.open():
            r = json.loads(line)
            c = counts[(r["model"], level(r["task"]))]
            c[0] += r.get("finish_reason") == "length"
            c[1] += 1
    return {k: cut / n for k, (cut, n) in counts.items()}


def train_seconds(work: Path) -> dict:
    times = {}
    path = work / "times.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            label, ms = line.split("\t")
            times[label] = int(ms) / 1000
    return times


def arm_seconds(label: str, times: dict):
    arm, seed = split_label(label)
    if arm is None or label not in times:
        return None
    base = STARTS_FROM.get(arm)
    return times[label] + (times.get(f"{base}-s{seed}", 0.0) if base else 0.0)


def split_label(label: str):
    m = re.fullmatch(r"(.+)-s(\d+)", label)
    return (m.group(1), m.group(2)) if m else (None, None)


def fmt(est, pct=True):
    if est is None or est.get("value") is None:
        return "-"
    v = est["value"]
    lo, hi = est.get("ci95", [None, None])
    if pct:
        s = f"{100 * v:.1f}"
        return s + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None else "")
    return f"{v:.1f}"


def table(work: Path) -> tuple[str, dict]:
    sampled, greedy = load_reports(work, "sampled"), load_reports(work, "greedy")
    cut = truncation(work, "sampled")
    times = train_seconds(work)
    levels = sorted({lv for m in list(sampled.values()) + list(greedy.values()) for lv in m},
                    key=lambda s: int(s[1:]))
    labels = list(dict.fromkeys(list(sampled) + list(greedy)))
    head = (["model"] + [f"pass@1 {lv}" for lv in levels] + [f"maj@n {MIDDLE}"]
            + [f"greedy {lv}" for lv in levels]
            + [f"reasoning tokens {MIDDLE}", f"truncated {MIDDLE}", f"gap closed {MIDDLE}",
               "train s"])
    rows = [head, ["---"] * len(head)]

    def p1(label, lv, reports=sampled):
        t = reports.get(label, {}).get(lv)
        return t["accuracy"]["value"] if t else None

    base, teacher = p1("base", MIDDLE), p1("teacher", MIDDLE)
    for label in labels:
        s, g = sampled.get(label, {}), greedy.get(label, {})
        mid = s.get(MIDDLE, {})
        gap = "-"
        if base is not None and teacher is not None and teacher > base and p1(label, MIDDLE) is not None:
            gap = f"{100 * (p1(label, MIDDLE) - base) / (teacher - base):.0f}%"
        secs = arm_seconds(label, times)
        rows.append([label] + [fmt(s.get(lv, {}).get("accuracy")) for lv in levels]
                    + [fmt(mid.get("maj_at_n"))]
                    + [fmt(g.get(lv, {}).get("accuracy")) for lv in levels]
                    + [fmt(mid.get("reasoning", {}).get("reasoning_tokens"), pct=False),
                       f"{100 * cut[(label, MIDDLE)]:.0f}%" if (label, MIDDLE) in cut else "-",
                       gap, f"{secs:.0f}" if secs is not None else "-"])
    # Seeds averaged: the mean of the seeds' pass@1.
    by_arm = defaultdict(list)
    for label in labels:
        arm, _ = split_label(label)
        if arm in ARMS:
            by_arm[arm].append(label)
    def seed_mean(labels, lv, reports):
        vals = [v for v in (p1(lb, lv, reports) for lb in labels) if v is not None]
        return f"{100 * mean(vals):.1f}" if vals else "-"

    for arm in ARMS:
        if not by_arm[arm]:
            continue
        secs = [x for x in (arm_seconds(lb, times) for lb in by_arm[arm]) if x is not None]
        rows.append([f"**{arm}** (mean of {len(by_arm[arm])} seeds)"]
                    + [seed_mean(by_arm[arm], lv, sampled) for lv in levels] + ["-"]
                    + [seed_mean(by_arm[arm], lv, greedy) for lv in levels]
                    + ["-"] * 3 + [f"{mean(secs):.0f}" if secs else "-"])
    md = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    return md, {"levels": levels, "sampled": sampled, "times": times, "labels": labels,
                "by_arm": by_arm}


def plots(work: Path, data: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    levels, sampled = data["levels"], data["sampled"]
    shown = [lb for lb in ["base", "teacher"] if lb in sampled] + \
        [arm for arm in ARMS if data["by_arm"][arm]]

    def value(name, lv):
        labels = data["by_arm"].get(name) or [name]
        vals = [sampled[lb][lv]["accuracy"]["value"] for lb in labels if lv in sampled.get(lb, {})]
        return mean(vals) if vals else 0.0

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(shown), 1)
    for i, name in enumerate(shown):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [100 * value(name, lv) for lv in levels], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))])
    ax.set_xticklabels([f"{lv} ({lv[1:]} operations)" for lv in levels])
    ax.set_xlabel("test level (L6 is harder than anything trained on)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Held-out pass@1 by level (seeds averaged)")
    fig.tight_layout()
    fig.savefig(work / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    times = data["times"]
    base = value("base", MIDDLE) if "base" in sampled else 0.0
    for arm in ARMS:
        pts = [(0.0, 100 * base)]
        for lb in data["by_arm"][arm]:
            secs = arm_seconds(lb, times)
            if secs is not None and MIDDLE in sampled.get(lb, {}):
                pts.append((secs, 100 * sampled[lb][MIDDLE]["accuracy"]["value"]))
        if len(pts) > 1:
            ax.plot(*zip(*sorted(pts)), marker="o", label=arm)
    if "teacher" in sampled:
        ax.axhline(100 * value("teacher", MIDDLE), color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("training wall-clock (s, one H100, arms run side by side)")
    ax.set_ylabel(f"pass@1 at {MIDDLE} (%)")
    ax.set_ylim(0, 100)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center right", fontsize=8)
    ax.set_title("Accuracy against training time (each seed a point)")
    fig.tight_layout()
    fig.savefig(work / "compute.png", dpi=120)
    plt.close(fig)
    return ["accuracy.png", "compute.png"]


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/arith-r1/work")
    md, data = table(work)
    written = plots(work, data)
    links = "\n".join(f"![{p}]({p})" for p in written)
    (work / "results.md").write_text(md + "\n\n" + links + "\n")
    print(md)
    print(f"wrote {work / 'results.md'}" + (f", {', '.join(written)}" if written else
                                             " (no plots: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
