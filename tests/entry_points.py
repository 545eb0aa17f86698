"""Running an entry point's `main()` in-process, the way a shell would, for tests."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main(script: str, *args: str) -> tuple[int, str, str]:
    """Runs `<script>` (a path under the repo, e.g. `jobs/evaluate.py`) main(args): (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = module.main(list(args))
        except SystemExit as exit_:  # parse_cli exits 2 on a bad config, like argparse
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()
