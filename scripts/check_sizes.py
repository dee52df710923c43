"""Fail when a hand-written module is over 400 lines or a function over 50 (STYLE.md, 11).

Usage: python scripts/check_sizes.py [ROOT]. Generated stubs (tether/v1) are left out.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def problems(root: Path) -> list[str]:
    found = []
    for folder in ("client", "server", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            if "v1" in path.parts:
                continue
            text = path.read_text()
            name = path.relative_to(root)
            if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
                found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(
                            f"{name}:{node.lineno} {node.name}: {length} lines "
                            f"(at most {MAX_FUNCTION_LINES})"
                        )
    return found


def main() -> int:
    found = problems(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
    print("\n".join(found) or "sizes: every module and function within the limits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
