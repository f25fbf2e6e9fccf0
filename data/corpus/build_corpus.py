"""Rebuilds the shipped demo corpus from the CPython 3.11.7 standard library (PSF licensed).

The corpus is committed, so nothing here runs at demo or test time; this script documents where
every file came from and regenerates the same bytes from the same interpreter:

    /root/.pyenv/versions/3.11.7/bin/python data/corpus/build_corpus.py

Contents:
    code/  top-level stdlib modules (*.py), by name, each <= 130 KB, until ~2.3 MB.
    prose/ the reference-manual topics that `pydoc` ships (pydoc_data/topics.py), one English
           text file per topic.
    LICENSE.txt the PSF license text of that interpreter.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

CODE_BUDGET_BYTES = 2_300_000
MAX_FILE_BYTES = 130_000


def main() -> None:
    if sys.version_info[:3] != (3, 11, 7):
        raise SystemExit(f"run with CPython 3.11.7 for identical bytes, not {sys.version.split()[0]}")
    here = Path(__file__).resolve().parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for sub in ("code", "prose"):
        shutil.rmtree(here / sub, ignore_errors=True)
        (here / sub).mkdir()
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if size > MAX_FILE_BYTES or total + size > CODE_BUDGET_BYTES:
            continue
        shutil.copyfile(path, here / "code" / path.name)
        total += size
    from pydoc_data.topics import topics

    for name in sorted(topics):
        (here / "prose" / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    shutil.copyfile(stdlib / "LICENSE.txt", here / "LICENSE.txt")


if __name__ == "__main__":
    main()
