"""Rebuild the embedded corpus's generated part and the embedded tokenizer, reproducibly.

    python tools/build_tokenizer.py             # regenerate generated_ja.txt, retrain, write assets
    python tools/build_tokenizer.py --check     # exit 1 when a rebuild would change the shipped files

The work is done by ``ramgpt.tokenizer_train.build_embedded`` (templates in ``ramgpt.embedded_corpus``).
To train a tokenizer of your own on a profile's data, use ``ramgpt tokenizer train`` (docs/tokenizer.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ramgpt.data import EMBEDDED_CORPUS_DIR  # noqa: E402
from ramgpt.tokenizer import EMBEDDED_TOKENIZER_DIR  # noqa: E402
from ramgpt.tokenizer_train import build_embedded, check_embedded  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare a rebuild with the shipped files; exit 1 on difference")
    args = ap.parse_args(argv)
    if args.check:
        differ = check_embedded()
        if differ:
            print("shipped files differ from a rebuild: " + ", ".join(differ))
            return 1
        print("shipped corpus and tokenizer match a rebuild")
        return 0
    tok = build_embedded(EMBEDDED_CORPUS_DIR, EMBEDDED_TOKENIZER_DIR, generate=True)
    print(f"{EMBEDDED_TOKENIZER_DIR}: vocab {tok.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
