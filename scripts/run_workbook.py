#!/usr/bin/env python3
"""Run every notebook in notebooks/ in order, in place, at full size; then print what was written.

Used by `make run`. Outputs are saved into the notebooks so they can be committed and read on the web.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        print("no notebooks yet: the data is prepared, and there is nothing else to run")
        return 0
    import nbformat
    from nbclient import NotebookClient

    for path in notebooks:
        started = time.perf_counter()
        print(f"running {path.relative_to(ROOT)} ...", flush=True)
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(notebook, timeout=None, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(notebook, path)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)

    print("\nwritten:")
    for path in sorted((ROOT / "checkpoints").glob("*")):
        print(f"  {path.relative_to(ROOT)}")
    for path in sorted((ROOT / "checkpoints").glob("*.json")):
        print(f"\n{path.name}: {json.dumps(json.loads(path.read_text()), indent=1)[:800]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
