"""Synthetic multi-step arithmetic word problems with verifiable answers, for recipes/tiny/chat.yaml.

    python data/make_arithmetic.py                      # -> data/arithmetic.jsonl (6,000 chats, seed 0)
    python data/make_arithmetic.py --rows 500 --out /tmp/small.jsonl --seed 1

Each line is one chat in the `messages` format the chat task reads:

    {"messages": [{"role": "user", "content": "Mia has 7 apples. She buys 5 more. She gives 3 to Tom. How many
      apples does Mia have now?"}, {"role": "assistant", "content": "7 + 5 = 12\\n12 - 3 = 9\\n#### 9"}]}

One worked line per step, then GSM8K's `#### answer` line, so the `exact` verifier with
`answer_regex: "####\\s*(-?\\d+)"` checks it. Problems have 1 to 6 steps; with 4 or more the answer is longer than
the tiny recipe's 48-token canvas, so training and generation go block after block. Each step adds or takes 1..9
and the count never goes below zero.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    ("Mia", "She"),
    ("Tom", "He"),
    ("Ana", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Sam", "He"),
    ("Ivy", "She"),
    ("Max", "He"),
]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards"]
GAINS = ["{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} from a friend.", "{p} wins {n} more."]
LOSSES = ["{p} gives {n} to {o}.", "{p} loses {n}.", "{p} sells {n}.", "{p} trades away {n}."]


def problem(rng: random.Random, steps: int) -> dict:
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    other = rng.choice([n for n, _ in NAMES if n != name])
    total = rng.randint(1, 9)
    sentences = [f"{name} has {total} {item}."]
    lines = []
    for _ in range(steps):
        n = rng.randint(1, 9)
        if total > n and rng.random() < 0.5:  # never below zero
            sentences.append(rng.choice(LOSSES).format(p=pronoun, n=n, o=other))
            lines.append(f"{total} - {n} = {total - n}")
            total -= n
        else:
            sentences.append(rng.choice(GAINS).format(p=pronoun, n=n))
            lines.append(f"{total} + {n} = {total + n}")
            total += n
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(lines) + f"\n#### {total}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "arithmetic.jsonl")
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=6)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = [problem(rng, rng.randint(1, args.max_steps)) for _ in range(args.rows)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)  # never a half-written data file
    print(f"wrote {args.rows} chats to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
