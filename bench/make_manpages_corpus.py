"""Build a few MB of real Japanese prose for GPU loss runs on machines without network access to
the Hugging Face Hub: the Japanese manual pages of Debian's manpages-ja / manpages-ja-dev
(the JM project's translations), rendered to plain text, one manual page per line (ramgpt's
``data.source: text`` reads one non-blank line as one document).

    apt-get download manpages-ja manpages-ja-dev
    for f in manpages-ja*.deb; do dpkg -x "$f" pages; done
    python bench/make_manpages_corpus.py pages/usr/share/man/ja OUT.txt

Needs groff (preconv, groff -Tutf8). Pages shorter than 200 characters, pages that are mostly not
Japanese, and exact duplicates are left out. The text keeps its upstream licences, so it is
not shipped with ramgpt; docs/benchmarks.md records which run used it.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import sys
from pathlib import Path

HEADER = re.compile(r"^[A-Z0-9_.:-]+\(\d\w*\)")  # the "LS(1) ... LS(1)" header and footer lines


def _is_japanese(ch: str) -> bool:
    return "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff"


def render(page: bytes) -> str:
    """One manual page (roff source) -> one line of text."""
    r = subprocess.run(["sh", "-c", "preconv -e utf-8 | groff -Tutf8 -man -rLL=2000n -P-cbou"], input=page,
                       capture_output=True, check=False)
    lines = [ln.strip() for ln in r.stdout.decode("utf-8", "replace").splitlines()]
    return re.sub(r"\s+", " ", " ".join(ln for ln in lines if ln and not HEADER.match(ln))).strip()


def main() -> int:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    docs: list[str] = []
    seen: set[str] = set()
    for f in sorted(root.rglob("*.gz")):
        if f.is_symlink():
            continue
        doc = render(gzip.decompress(f.read_bytes()))
        if len(doc) < 200 or sum(map(_is_japanese, doc)) < 0.15 * len(doc):
            continue
        digest = hashlib.sha1(doc.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            docs.append(doc)
    out.write_text("\n".join(docs) + "\n", encoding="utf-8")
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
