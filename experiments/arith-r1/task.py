#!/usr/bin/env python3
"""Multi-step arithmetic word problems with exactly checkable answers, and R1-style traces of
them written by a program: the task of the task-accuracy experiment (docs/EXPERIMENTS.md,
"Task accuracy"). Standard library only; the same seed gives the same files.

A problem is a story: a person starts with some items, then a chain of events changes the
count. Each event is one or two arithmetic operations (buy, give away, a number of boxes of
k each, share equally, multiply). A problem's level is its number of operations.

    python3 task.py --out DIR [--seed 1] [--train 12000] [--test 100]
    python3 task.py --check     # verify every trace's arithmetic and the train/test split

writes, under DIR:
  train.jsonl          prompts with references, levels 2-4 (id, question, answer, level)
  traces/samples-00000.jsonl
                       the same problems with a program-written trace, in gen-data's sample
                       format: what the teacher is fine-tuned on
  test-L{2,3,4,6}.jsonl  held-out problems per level; level 6 is harder than any trained one

Train and test are disjoint by construction: a problem's text decides by hash which side it
may appear on (one in ten texts is test-only), and no text appears twice.
"""

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells",
         "stamps", "beads", "cookies", "toy cars"]
TRAIN_LEVELS = [2, 3, 4]
TEST_LEVELS = [2, 3, 4, 6]
# Keeps every intermediate count a number a small model can add and subtract.
MAX_COUNT = 999
TEST_BUCKET = 10


def is_test_text(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % TEST_BUCKET == 0


def event(rng: random.Random, x: int, who: str, item: str, ops_left: int):
    """One event applied to count x: (sentence, trace lines, new count, operations used)."""
    kinds = ["buy", "give", "mul", "share"]
    if ops_left >= 2:
        kinds += ["boxes", "boxes"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "buy" and x < MAX_COUNT - 10:
            a = rng.randint(2, min(99, MAX_COUNT - x))
            y = x + a
            return (f"Then {who} gets {a} more {item}.",
                    [f"{who} gets {a} more: {x} + {a} = {y}."], y, 1)
        if kind == "give" and x > 3:
            a = rng.randint(1, min(99, x - 1))
            y = x - a
            return (f"Then {who} gives {a} {item} to a friend.",
                    [f"{who} gives away {a}: {x} - {a} = {y}."], y, 1)
        if kind == "mul" and 2 * x <= MAX_COUNT:
            k = rng.randint(2, min(5, MAX_COUNT // x))
            y = x * k
            word = {2: "doubles", 3: "triples"}.get(k, f"multiplies by {k}")
            sentence = (f"Then {who} {word} the number of {item}." if k <= 3 else
                        f"Then the number of {item} {who} has becomes {k} times as large.")
            return sentence, [f"{who} has {k} times as many: {x} * {k} = {y}."], y, 1
        if kind == "share":
            ks = [k for k in range(2, 10) if x % k == 0 and x // k >= 2]
            if ks:
                k = rng.choice(ks)
                y = x // k
                return (f"Then {who} shares the {item} equally among {k} people, {who} included, "
                        f"and keeps one share.",
                        [f"{who} keeps one of {k} equal shares: {x} / {k} = {y}."], y, 1)
        if kind == "boxes" and x < MAX_COUNT - 20:
            b = rng.randint(2, 9)
            c = rng.randint(2, min(12, (MAX_COUNT - x) // b)) if (MAX_COUNT - x) // b >= 2 else 0
            if c >= 2:
                t = b * c
                y = x + t
                return (f"Then {who} buys {b} boxes with {c} {item} in each box.",
                        [f"{who} buys {b} boxes of {c}: {b} * {c} = {t}.",
                         f"{x} + {t} = {y}."], y, 2)
    raise ValueError("no event applies")


def problem(rng: random.Random, level: int):
    """A problem of exactly `level` operations: (question, trace, answer)."""
    while True:
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        x = rng.randint(5, 99)
        sentences = [f"{who} has {x} {item}."]
        lines = [f"{who} starts with {x} {item}."]
        ops = 0
        try:
            while ops < level:
                s, ls, x, used = event(rng, x, who, item, level - ops)
                sentences.append(s)
                lines += ls
                ops += used
        except ValueError:
            continue
        question = " ".join(sentences) + f" How many {item} does {who} have now?"
        lines.append(f"So {who} has {x} {item}.")
        return question, "\n".join(lines), x


def sample_record(pid: str, question: str, trace: str, answer: int) -> dict:
    """A gen-data sample (the file contract of docs/gen-data.md) written by the program."""
    final = f"The answer is \\boxed{{{answer}}}."
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n{final}"}]
    key = hashlib.sha256(json.dumps(["program", messages]).encode()).hexdigest()
    return {"key": key, "prompt_id": pid, "sample_index": 0, "messages": messages,
            "reasoning": trace, "answer": final, "finish_reason": "stop", "truncated": False,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "teacher_model": "program",
            "endpoint": "experiments/arith-r1/task.py", "latency_s": 0.0, "attempts": 1,
            "timestamp": "2026-12-06T00:00:00Z", "reference": str(answer),
            "extracted": str(answer), "correct": True}


def generate(seed: int, n_train: int, n_test: int):
    rng = random.Random(seed)
    seen: set[str] = set()
    train, tests = [], {lv: [] for lv in TEST_LEVELS}
    want_test = lambda: any(len(v) < n_test for v in tests.values())
    while len(train) < n_train or want_test():
        level = rng.choice(sorted(set(TRAIN_LEVELS) | set(TEST_LEVELS)))
        question, trace, answer = problem(rng, level)
        if question in seen:
            continue
        test_side = is_test_text(question)
        if test_side and level in tests and len(tests[level]) < n_test:
            seen.add(question)
            tests[level].append({"id": f"L{level}-{len(tests[level])}", "question": question,
                                 "answer": str(answer), "level": level})
        elif not test_side and level in TRAIN_LEVELS and len(train) < n_train:
            seen.add(question)
            train.append((f"train-{len(train)}", question, trace, answer, level))
    return train, tests


STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def check(train, tests) -> list[str]:
    """What is wrong with a generated set: a trace step whose arithmetic is false, a trace
    that does not end at the answer, a level off its operation count, or train and test
    sharing a text or sitting on the wrong side of the hash split."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a // b if a % b == 0 else None}
    errors = []
    for pid, question, trace, answer, level in train:
        steps = STEP.findall(trace)
        for a, op, b, c in steps:
            if ops[op](int(a), int(b)) != int(c):
                errors.append(f"{pid}: {a} {op} {b} = {c} is false")
        if not steps or int(steps[-1][3]) != answer:
            errors.append(f"{pid}: the trace does not end at the answer {answer}")
        if len(steps) != level:
            errors.append(f"{pid}: level {level} with {len(steps)} operations")
        if is_test_text(question):
            errors.append(f"{pid}: a test-side text in train")
    test_texts = [r["question"] for rows in tests.values() for r in rows]
    if any(not is_test_text(q) for q in test_texts):
        errors.append("a train-side text in test")
    shared = {q for _, q, _, _, _ in train} & set(test_texts)
    if shared or len(set(test_texts)) != len(test_texts):
        errors.append(f"{len(shared)} texts shared by train and test, or a test text twice")
    return errors


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--check", action="store_true",
                    help="generate, verify every trace and the split, write nothing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--test", type=int, default=100)
    a = ap.parse_args()
    train, tests = generate(a.seed, a.train, a.test)
    if a.check:
        errors = check(train, tests)
        for e in errors[:20]:
            print(e)
        print(f"{len(train)} train and {sum(map(len, tests.values()))} test problems: "
              f"{len(errors)} errors")
        raise SystemExit(1 if errors else 0)
    if a.out is None:
        ap.error("--out is required unless --check")
    write_jsonl(a.out / "train.jsonl", ({"id": pid, "question": q, "answer": str(ans), "level": lv}
                                        for pid, q, _, ans, lv in train))
    write_jsonl(a.out / "traces" / "samples-00000.jsonl",
                (sample_record(pid, q, t, ans) for pid, q, t, ans, _ in train))
    for level, rows in tests.items():
        write_jsonl(a.out / f"test-L{level}.jsonl", rows)
    print(f"{len(train)} train problems (levels {TRAIN_LEVELS}), "
          f"{a.test} test problems per level {TEST_LEVELS} -> {a.out}")


if __name__ == "__main__":
    main()
