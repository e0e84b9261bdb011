"""Make a large UTF-8 corpus by repeating and shuffling the lines of a small one.

    python benchmarks/make_corpus.py /work/shared/corpora/tinyshakespeare.txt /tmp/corpus-1g.txt \
        --size 1G --seed 0 --non-ascii-share 0.01

Each round writes every line of the source once, in a fresh random order, so the character
statistics match the source while no two rounds are alike. With --non-ascii-share P, each line
is replaced with probability P by a synthetic non-ASCII line, so the decoder's non-ASCII path
runs on (nearly) every chunk:
  * --style mixed: accented Latin words, a run of CJK characters and emoji (2-, 3- and 4-byte
    UTF-8 characters) between ASCII words;
  * --style cjk: Chinese-like lines drawn from a few thousand CJK ideographs with a Zipf-like
    frequency, and Chinese punctuation (use --non-ascii-share 1 for a mostly non-ASCII corpus).
The output holds whole lines only: it ends at the last line that fits in --size bytes.
The same arguments always give the same bytes.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

ACCENTED = ["café", "naïve", "señor", "Zürich", "façade", "über", "crème brûlée", "Ærø", "Łódź", "Ελλάδα",
            "Москва", "Ångström", "smørrebrød", "jalapeño", "coöperate"]
EMOJI = ["😀", "🚀", "🎉", "🐍", "🌍", "❤️", "👍🏽", "🇯🇵", "👨‍👩‍👧", "🍕"]
CJK_CHARS = 3000  # distinct ideographs in the cjk style: uint16 ids, like a real Chinese corpus
CJK_PUNCT = "，。、；：？！「」"
POOL = 4000  # synthetic lines generated once, then drawn at random


def parse_size(text: str) -> int:
    """'1G', '200M', '64k' or a plain byte count (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 200M, 1048576)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def mixed_line(rng: np.random.Generator, words: list[str]) -> str:
    parts = [words[i] for i in rng.integers(0, len(words), size=rng.integers(3, 9))]
    parts.insert(rng.integers(len(parts) + 1), str(rng.choice(ACCENTED)))
    parts.insert(rng.integers(len(parts) + 1), "".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 100, rng.integers(2, 6))))
    parts.insert(rng.integers(len(parts) + 1), str(rng.choice(EMOJI)))
    return " ".join(parts)


def cjk_line(rng: np.random.Generator) -> str:
    # Zipf (p ~ 1/rank): a few hundred common characters carry most of the text, as in Chinese
    p = 1.0 / np.arange(1, CJK_CHARS + 1)
    ranks = rng.choice(CJK_CHARS, size=rng.integers(8, 40), p=p / p.sum())
    chars = [chr(0x4E00 + int(r) * 7 % 20000) for r in ranks]  # spread over the CJK block
    for at in sorted(rng.integers(1, len(chars), size=len(chars) // 10), reverse=True):
        chars.insert(int(at), CJK_PUNCT[int(rng.integers(len(CJK_PUNCT)))])
    return "".join(chars) + "。"


def synthetic_pool(rng: np.random.Generator, style: str, words: list[str]) -> list[bytes]:
    make = (lambda: mixed_line(rng, words)) if style == "mixed" else (lambda: cjk_line(rng))
    return [(make() + "\n").encode("utf-8") for _ in range(POOL)]


def generate(source: Path, output: Path, size: int, seed: int, share: float, style: str) -> int:
    """Write the corpus; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    lines = source.read_bytes().splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    if not lines:
        raise SystemExit(f"{source} has no lines")
    words = source.read_text(encoding="utf-8").split() or ["word"]
    pool = synthetic_pool(rng, style, words) if share > 0 else []
    written = 0
    with open(output, "wb") as f:
        while written < size:
            block = [lines[i] for i in rng.permutation(len(lines)).tolist()]
            if share > 0:
                swap = np.flatnonzero(rng.random(len(block)) < share)
                for at, k in zip(swap.tolist(), rng.integers(0, len(pool), size=len(swap)).tolist()):
                    block[at] = pool[k]
            data = b"".join(block)
            if len(data) > size - written:  # last round: whole lines only
                data = data[: data.rfind(b"\n", 0, size - written) + 1]
                if not data:
                    break
            f.write(data)
            written += len(data)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="UTF-8 text whose lines are repeated and shuffled")
    p.add_argument("output", type=Path, help="where to write the corpus (keep it out of the repository)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="bytes at most (e.g. 1G, 200M); default 1G")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same arguments give the same bytes")
    p.add_argument("--non-ascii-share", type=float, default=0.0, metavar="P",
                   help="probability that a line is replaced by a synthetic non-ASCII line (0..1)")
    p.add_argument("--style", choices=("mixed", "cjk"), default="mixed", help="kind of synthetic non-ASCII line")
    a = p.parse_args(argv)
    if not 0.0 <= a.non_ascii_share <= 1.0:
        p.error("--non-ascii-share must be between 0 and 1")
    t0 = time.perf_counter()
    n = generate(a.source, a.output, a.size, a.seed, a.non_ascii_share, a.style)
    print(f"wrote {a.output}: {n:,} bytes in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
