"""The size limits of the code: no module over 800 lines, no class over 300, no function over 60
(docstrings not counted in classes and functions; tests/ and scripts/ excluded).

    python scripts/check_sizes.py            # every item over its limit; exit 1 if any
    python scripts/check_sizes.py --top 5    # also the largest modules, classes and functions
"""
import argparse
import ast
import os
import sys

LIMITS = {"module": 800, "class": 300, "function": 60}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("tests", "scripts", "runs", "outputs", "multirun", "wandb")


def sizes(root: str):
    """(lines, kind, where) of every module, class and function under root."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP and "venv" not in d]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            src = open(path, encoding="utf-8").read()
            rows.append((len(src.splitlines()), "module", rel))
            for node in ast.walk(ast.parse(src)):
                kind = ("class" if isinstance(node, ast.ClassDef) else
                        "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
                if kind is None:
                    continue
                size = node.end_lineno - node.lineno + 1
                first = node.body[0] if node.body else None
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    size -= first.end_lineno - first.lineno + 1
                rows.append((size, kind, f"{rel}:{node.name}"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=0, help="also print the N largest of each kind")
    p.add_argument("--root", default=REPO, help="the checkout to measure (default: this one)")
    a = p.parse_args()
    rows = sizes(a.root)
    over = [r for r in rows if r[0] > LIMITS[r[1]]]
    for kind in LIMITS if a.top else ():
        for size, _, where in sorted((r for r in rows if r[1] == kind), reverse=True)[:a.top]:
            print(f"{kind:8s} {size:5d}  {where}")
    for size, kind, where in sorted(over, reverse=True):
        print(f"OVER: {kind} {where} has {size} lines (limit {LIMITS[kind]})")
    print(f"{len(over)} over the limits" if over else "every module, class and function within the limits")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
