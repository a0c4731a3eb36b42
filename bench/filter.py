"""The server's content filter against the test corpora: evasions caught, benign prompts passed.

Reads tests/data/filter_evasions.txt (class<TAB>prompt, Python escapes) and
tests/data/benign_prompts.txt, runs every prompt through `ContentFilter.blocked_term` with the
bundled blocklist, and prints a markdown table: per evasion class, tried and caught; benign
prompts tried and false positives; time per prompt over both corpora (the first pass, with the
filter's caches cold; the fastest of later ones; the same with the per-word cache cleared, as
for a prompt of new words), and for a hostile 500-character prompt of one-letter tokens.

--baseline FILE also runs another filter.py (e.g. the one before issue 14, written out with
`git show 48460d4^:src/t2v/serve/filter.py > /tmp/filter_before.py`) with the same
blocklist, and puts its figures beside the current ones.
Run: .venv/bin/python bench/filter.py [--baseline FILE]   (a second or two)
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import time
from collections import Counter
from pathlib import Path

from t2v.serve import filter as current

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
HOSTILE = ("c " * 250)[:500]  # every token starts a term: the matcher's worst case
REPEATS = 5


def corpora() -> tuple[list[tuple[str, str]], list[str]]:
    evasions = []
    for line in (DATA / "filter_evasions.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            kind, escaped = line.split("\t")
            evasions.append((kind, codecs.decode(escaped, "unicode_escape")))
    lines = (DATA / "benign_prompts.txt").read_text(encoding="utf-8").splitlines()
    return evasions, [line for line in lines if line.strip() and not line.startswith("#")]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"filter_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(module, evasions, benign) -> dict:
    f = module.ContentFilter.from_file(current.DEFAULT_BLOCKLIST)
    prompts = [p for _, p in evasions] + benign
    start = time.perf_counter()
    caught = Counter(kind for kind, p in evasions if f.blocked_term(p) is not None)
    false_positives = [p for p in benign if f.blocked_term(p) is not None]
    cold = (time.perf_counter() - start) / len(prompts)
    passes, fresh, hostile = [], [], []
    cache = getattr(module, "_variants", None)  # the current filter's per-word cache
    for _ in range(REPEATS):  # the fastest pass: the least disturbed by other work
        start = time.perf_counter()
        for p in prompts:
            f.blocked_term(p)
        passes.append((time.perf_counter() - start) / len(prompts))
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
        start = time.perf_counter()
        for p in prompts:
            f.blocked_term(p)
        fresh.append((time.perf_counter() - start) / len(prompts))
        start = time.perf_counter()
        f.blocked_term(HOSTILE)
        hostile.append(time.perf_counter() - start)
    return {
        "caught": caught,
        "fp": false_positives,
        "cold": cold,
        "mean": min(passes),
        "fresh": min(fresh),
        "hostile": min(hostile),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another filter.py to compare against")
    args = parser.parse_args()
    evasions, benign = corpora()
    runs = {"after": measure(current, evasions, benign)}
    if args.baseline:
        runs = {"before": measure(load(args.baseline), evasions, benign), **runs}
    tried = Counter(kind for kind, _ in evasions)

    print("| evasion class | tried | " + " | ".join(f"caught ({n})" for n in runs) + " |")
    print("|---|---:|" + "---:|" * len(runs))
    for kind in tried:
        cells = " | ".join(str(r["caught"][kind]) for r in runs.values())
        print(f"| {kind} | {tried[kind]} | {cells} |")
    total = " | ".join(f"**{sum(r['caught'].values())}**" for r in runs.values())
    print(f"| **all evasions** | **{len(evasions)}** | {total} |")
    fps = " | ".join(str(len(r["fp"])) for r in runs.values())
    print(f"| benign prompts: false positives | {len(benign)} | {fps} |")
    colds = " | ".join(f"{r['cold'] * 1e6:.0f} µs" for r in runs.values())
    print(f"| time per prompt, first pass (caches cold) | | {colds} |")
    means = " | ".join(f"{r['mean'] * 1e6:.0f} µs" for r in runs.values())
    print(f"| time per prompt, fastest of {REPEATS} more passes | | {means} |")
    fresh = " | ".join(f"{r['fresh'] * 1e6:.0f} µs" for r in runs.values())
    print(f"| time per prompt, words not seen before (word cache cleared) | | {fresh} |")
    worst = " | ".join(f"{r['hostile'] * 1e6:.0f} µs" for r in runs.values())
    print(f"| time, 500-char one-letter prompt | | {worst} |")
    for name, r in runs.items():
        for p in r["fp"]:
            print(f"false positive ({name}): {p!r}")


if __name__ == "__main__":
    main()
