"""The longest Python and C++ functions of the package (lines, definition to end).

    python .ci/function_lengths.py [--top N] [--over LINES] [--check] [ROOT]

With --check it exits 1 when a function is over LINES (CI runs it so).

Python: every function and method of mtcompile/ and passes/ (ast). C++: every function body of
mtcompile/*/src (brace matching on the text, comments and strings blanked first)."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

_NOT_NAMES = {"__attribute__", "target", "always_inline", "inline"}
_CONTAINER = re.compile(r"\b(namespace|struct|class|enum|union)\b|extern\s+\"C\"")


def python_functions(root: Path) -> list[tuple[int, str]]:
    out = []
    for d in ("mtcompile", "passes"):
        for path in sorted((root / d).rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.parents if p != root):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    out.append(
                        (
                            node.end_lineno - first + 1,
                            f"{path.relative_to(root)}:{node.lineno} {node.name}",
                        )
                    )
    return out


def _blank(text: str) -> str:
    """Comments, strings and character literals as spaces (newlines kept)."""
    pattern = r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|^\s*#[^\n]*'
    return re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S | re.M)


def cpp_functions(root: Path) -> list[tuple[int, str]]:
    out = []
    for path in sorted(root.glob("mtcompile/*/src/*.[ch]*")):
        text = _blank(path.read_text())
        stack: list[tuple[str, int, str]] = []  # (kind, first line, name)
        head_start = 0
        for i, c in enumerate(text):
            if c == "{":
                head = text[head_start:i]
                if head.count("(") > head.count(")"):  # a brace inside a parameter list
                    stack.append(("expr", 0, ""))
                    continue
                in_fn = any(k == "fn" for k, _, _ in stack)
                if in_fn:
                    kind = "inner"
                elif _CONTAINER.search(head) and "(" not in head:
                    kind = "container"
                else:
                    kind = "fn" if "(" in head and "=" not in head.split("(")[0] else "other"
                stripped = head.lstrip()
                first = text.count("\n", 0, head_start + (len(head) - len(stripped))) + 1
                names = [n for n in re.findall(r"([\w:~]+)\s*\(", head) if n not in _NOT_NAMES]
                stack.append((kind, first, names[0] if names else "?"))
                head_start = i + 1
            elif c == "}":
                kind, first, name = stack.pop() if stack else ("other", 0, "?")
                if kind == "expr":
                    continue
                if kind == "fn":
                    last = text.count("\n", 0, i) + 1
                    out.append((last - first + 1, f"{path.relative_to(root)}:{first} {name}"))
                head_start = i + 1
            elif c == ";":
                head_start = i + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?", default=".")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--over", type=int, default=50)
    ap.add_argument("--check", action="store_true", help="exit 1 if a function is over")
    args = ap.parse_args()
    root = Path(args.root)
    total = 0
    for lang, found in (("Python", python_functions(root)), ("C++", cpp_functions(root))):
        found.sort(reverse=True)
        over = sum(1 for n, _ in found if n > args.over)
        total += over
        print(f"{lang}: {len(found)} functions, {over} over {args.over} lines; longest:")
        for n, where in found[: max(args.top, over)]:
            print(f"  {n:4d}  {where}")
    if args.check and total:
        raise SystemExit(f"{total} function(s) over {args.over} lines (STYLE.md: split them)")


if __name__ == "__main__":
    main()
