"""Run every ```python block of the README in order, in one namespace, in the current folder.

    python tests/readme_snippets.py README.md      # from any folder: imports come from what is installed

tests/test_readme.py runs it against the repository; CI also runs it from a scratch folder after a plain
`pip install .`, so the snippets are checked against the installed modules, not the checkout."""
import re
import sys
from pathlib import Path

import torch


def run_snippets(readme: Path) -> int:
    snippets = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # the failing snippet and line are in the traceback
            raise SystemExit(f"README snippet {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    return len(snippets)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"{run_snippets(Path(sys.argv[1]))} README snippets ran")
