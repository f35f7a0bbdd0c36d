"""Write the bundled general-data replay set from the Python language reference that CPython
ships in its standard library (`pydoc_data.topics`, the text behind `help("assert")`; Python
Software Foundation License, see data/README.md). Mixed into a domain run as replay data
(conf/data/materials_replay.yaml), it keeps some general text and chat in every batch.

    python -m data.make_general            # rewrites data/general/*.jsonl
    python -m data.make_general --out DIR  # somewhere else

Deterministic for a given Python version (the topics change between CPython releases).
Outputs:
  cpt.jsonl         {"text": str}                          one reference topic per document
  sft.jsonl         {"question", "answer": str}            a topic's title -> its opening paragraph
                                                           (map with columns: {question: prompt, answer: completion})
  preference.jsonl  {"prompt", "chosen", "rejected": str}  rejected = another topic's paragraph
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from pydoc_data.topics import topics

OUT_DIR = Path(__file__).resolve().parent / "general"
SEED = 2409
MAX_DOC_CHARS = 3000  # keeps the set small (about 0.4 MB) and the documents training-sized


def title_and_paragraphs(text: str):
    """The topic's title line and its prose paragraphs (grammar and code blocks, indented, dropped)."""
    lines = text.strip().splitlines()
    title = lines[0].strip()
    paragraphs, current = [], []
    for line in lines[2:] + [""]:
        if line.strip() and not line.startswith(" ") and not re.fullmatch(r"[*=\-~^]+", line.strip()):
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return title, [p for p in paragraphs if len(p) > 80 and not p.endswith(":")]


def build():
    rng = random.Random(SEED)
    docs, chats, pairs = [], [], []
    entries = []
    for name in sorted(topics):
        title, paragraphs = title_and_paragraphs(topics[name])
        text = topics[name].strip()
        docs.append({"text": text[:MAX_DOC_CHARS].rsplit("\n\n", 1)[0] if len(text) > MAX_DOC_CHARS else text})
        if paragraphs:
            entries.append((name, title, paragraphs))
    for name, title, paragraphs in entries:
        subject = re.sub(r"^The ", "the ", title.replace("*", "").strip())
        question = f"In Python, what does the language reference say about {subject}?"
        chats.append({"question": question, "answer": paragraphs[0]})
        for extra in paragraphs[1:3]:
            chats.append({"question": f"Tell me more about {subject} in Python.", "answer": extra})
        other = rng.choice([e for e in entries if e[0] != name])
        pairs.append({"prompt": question, "chosen": paragraphs[0], "rejected": other[2][0]})
    return {"cpt.jsonl": docs, "sft.jsonl": chats, "preference.jsonl": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build().items():
        (args.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{args.out / name}: {len(rows)} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
