#!/usr/bin/env python3
"""The task-accuracy experiment's table and plots, from what run.sh wrote under WORK:
eval-sampled*/ and eval-greedy*/ (distill eval reports; several directories of each kind are
merged by model label), times.tsv (wall-clock milliseconds per stage and arm).

    python3 experiments/arith-r1/report.py experiments/arith-r1/work

writes WORK/results.md (the table) and, where matplotlib is installed, WORK/accuracy.png
(pass@1 per level and arm) and WORK/compute.png (middle-level greedy accuracy against
optimizer steps, from eval-curve*/: the arms' mid-run exports).
Arms are the labels `<arm>-s<seed>`; their seeds are averaged, and each seed is also listed.
"""

import json
import re
import sys
import tomllib
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
            # A run resumed across calls of run.sh has a line per call.
            times[label] = times.get(label, 0.0) + int(ms) / 1000
    # A training run's own count (train_s on its metrics lines) includes calls that were
    # stopped before run.sh could time them.
    for metrics in work.glob("runs/*/runs/metrics.jsonl"):
        lines = metrics.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        if "train_s" in last:
            times[metrics.parent.parent.name] = last["train_s"]
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
    return md, {"levels": levels, "sampled": sampled, "greedy": greedy, "times": times,
                "labels": labels, "by_arm": by_arm, "curve": load_reports(work, "curve")}


def max_steps(work: Path, run: str):
    path = work / "runs" / run / "recipe.toml"
    if not path.exists():
        return None
    return tomllib.loads(path.read_text()).get("train", {}).get("max_steps")


def curve_points(work: Path, data: dict, label: str) -> dict:
    """step -> greedy accuracy at MIDDLE (%) of one arm's seed: its mid-run exports
    (eval-curve, labelled RUN@STEP), its final model, and for an arm that starts from another
    run (STARTS_FROM) that run's points first, its own shifted by that run's steps."""
    arm, seed = split_label(label)
    greedy, curve = data["greedy"], data["curve"]
    pts, offset, runs = {}, 0, [label]
    if arm in STARTS_FROM:
        runs = [f"{STARTS_FROM[arm]}-s{seed}", label]
    base = greedy.get("base", {}).get(MIDDLE)
    if base:
        pts[0] = 100 * base["accuracy"]["value"]
    for run in runs:
        for lb, levels in curve.items():
            name, _, step = lb.partition("@")
            if name == run and MIDDLE in levels:
                pts[offset + int(step)] = 100 * levels[MIDDLE]["accuracy"]["value"]
        total = max_steps(work, run)
        if total is None:
            return {}
        final = greedy.get(run, {}).get(MIDDLE)
        if final:
            pts[offset + total] = 100 * final["accuracy"]["value"]
        offset += total
    return pts


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
    base = data["greedy"].get("base", {}).get(MIDDLE, {}).get("accuracy", {}).get("value")
    for i, arm in enumerate(ARMS):
        color = f"C{i}"
        per_seed = [curve_points(work, data, label) for label in data["by_arm"][arm]]
        per_seed = [pts for pts in per_seed if pts]
        for pts in per_seed:
            ax.plot(*zip(*sorted(pts.items())), color=color, alpha=0.3, linewidth=1)
        shared = set.intersection(*(set(pts) for pts in per_seed)) if per_seed else set()
        if shared:
            steps = sorted(shared)
            ax.plot(steps, [mean(pts[x] for pts in per_seed) for x in steps], color=color,
                    marker="o", label=arm)
    if base is not None:
        ax.plot([0], [100 * base], "ko", label="student before training")
    teacher = data["greedy"].get("teacher", {}).get(MIDDLE, {}).get("accuracy", {}).get("value")
    if teacher is not None:
        ax.axhline(100 * teacher, color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("optimizer steps (32 sequences each; kd-then-on-policy: kd, then on-policy)")
    ax.set_ylabel(f"greedy accuracy at {MIDDLE} (%)")
    ax.set_ylim(0, 100)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Accuracy against training steps (mean of seeds; each seed faint)")
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
