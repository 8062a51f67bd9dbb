"""Build the multi-domain corpus the tiny MoE is trained, calibrated and evaluated on.

Every source is a local Debian package, so the corpus rebuilds offline and byte for byte:
  python  Python standard-library source (/usr/lib/python3.11, package libpython3.11-stdlib)
  docs    Python documentation, reStructuredText sources (python3-doc)
  de es it ru pl cs   fortunes in six natural languages (fortunes-de, -es, -it, -ru, -pl, -cs)

Documents (a source file, a doc page, one fortune) are assigned to train / calib / eval by a
hash of their identity, so the splits never share a document. calib and eval are capped and
written to data/ (committed); train goes to build/corpus/ (rebuilt on demand).

    python scripts/build_corpus.py --out build/corpus --data data
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

PY_STDLIB = Path("/usr/lib/python3.11")
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = Path("/usr/share/games/fortunes")
LANGUAGES = ("de", "es", "it", "ru", "pl", "cs")
DOMAINS = ("python", "docs") + LANGUAGES
APT_PACKAGES = ("libpython3.11-stdlib", "python3-doc") + tuple(f"fortunes-{l}" for l in LANGUAGES)

# Split fractions by document hash, and caps on the committed splits (characters).
EVAL_FRACTION, CALIB_FRACTION = 0.04, 0.04
EVAL_CHARS, CALIB_CHARS = 60_000, 120_000
TRAIN_CHARS = 6_000_000  # per domain: keeps the large domains from drowning the small ones
MAX_DOC_CHARS = 6_000  # long source files are cut into pieces of about this size


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None  # a few fortune files are legacy 8-bit encodings: skip, don't guess


def _pieces(doc_id: str, text: str):
    """Cut long documents at blank lines into pieces of ~MAX_DOC_CHARS."""
    chunk, size, n = [], 0, 0
    for para in text.split("\n\n"):
        chunk.append(para)
        size += len(para) + 2
        if size >= MAX_DOC_CHARS:
            yield f"{doc_id}#{n}", "\n\n".join(chunk)
            chunk, size, n = [], 0, n + 1
    if chunk and "".join(chunk).strip():
        yield f"{doc_id}#{n}", "\n\n".join(chunk)


def python_documents():
    for path in sorted(PY_STDLIB.rglob("*.py")):
        rel = path.relative_to(PY_STDLIB)
        if rel.parts[0] in ("test", "idlelib", "lib2to3", "site-packages", "dist-packages"):
            continue
        if (text := _read_text(path)) and text.strip():
            yield from _pieces(f"python/{rel}", text)


def docs_documents():
    for path in sorted(PY_DOCS.rglob("*.txt")):
        if (text := _read_text(path)) and text.strip():
            yield from _pieces(f"docs/{path.relative_to(PY_DOCS)}", text)


def fortune_documents(lang: str):
    for path in sorted((FORTUNES / lang).iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = _read_text(path)
        if text is None:
            continue
        for i, fortune in enumerate(text.split("\n%\n")):
            fortune = fortune.strip("%\n")
            if len(fortune) >= 20:
                yield f"{lang}/{path.name}:{i}", fortune


def documents(domain: str):
    if domain == "python":
        return python_documents()
    if domain == "docs":
        return docs_documents()
    return fortune_documents(domain)


def split_of(doc_id: str) -> str:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if h < EVAL_FRACTION:
        return "eval"
    if h < EVAL_FRACTION + CALIB_FRACTION:
        return "calib"
    return "train"


def build_domain(domain: str) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    for doc_id, text in documents(domain):
        splits[split_of(doc_id)].append(text)
    if not all(splits.values()):
        raise SystemExit(f"domain {domain!r} has an empty split: are {', '.join(APT_PACKAGES)} installed?")
    caps = {"train": TRAIN_CHARS, "calib": CALIB_CHARS, "eval": EVAL_CHARS}
    rng = random.Random(f"corpus-{domain}")
    for name, docs in splits.items():
        rng.shuffle(docs)
        kept, size = [], 0
        for d in docs:
            if size >= caps[name]:
                break
            kept.append(d)
            size += len(d)
        splits[name] = kept
    return splits


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/corpus"))
    ap.add_argument("--data", type=Path, default=Path("data"))
    args = ap.parse_args()
    for domain in DOMAINS:
        splits = build_domain(domain)
        write_jsonl(args.out / "train" / f"{domain}.jsonl", splits["train"])
        for name in ("calib", "eval"):
            write_jsonl(args.data / name / f"{domain}.jsonl", splits[name])
        sizes = {k: sum(map(len, v)) for k, v in splits.items()}
        print(f"{domain:7s} docs " + " ".join(f"{k}={len(v)}" for k, v in splits.items())
              + "  chars " + " ".join(f"{k}={v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
