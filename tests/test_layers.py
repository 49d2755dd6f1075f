"""The top-level modules import downward only: pyproject.toml's [tool.prefkd] spine_layers, read
against the import graph of every import statement (inside functions too). lint-imports checks
prefkd/ itself (import-linter analyses packages only, and these are plain modules)."""
import ast
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layers():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        spec = tomllib.load(f)["tool"]["prefkd"]["spine_layers"]
    return [[m.strip() for m in line.split("|")] for line in spec]


def imported(path: str, names) -> set:
    """The names among `names` that the module at `path` imports (`prefkd.x` counts as prefkd)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(names)


def upward_edges(root: str = ROOT):
    """(importer, imported) pairs that break the layers: into a layer above, or a sibling."""
    levels = layers()
    rank = {m: i for i, line in enumerate(levels) for m in line}
    bad = []
    for module, level in rank.items():
        if module == "prefkd":
            paths = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "prefkd")) for f in fs
                     if f.endswith(".py")]
        else:
            paths = [os.path.join(root, module + ".py")]
        for path in paths:
            for other in imported(path, rank) - {module}:
                if rank[other] <= level:
                    bad.append((os.path.relpath(path, root), other))
    return sorted(bad)


def test_every_top_level_module_is_in_a_layer():
    named = {m for line in layers() for m in line}
    here = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"prefkd"}
    assert here - named == set(), "add these modules to [tool.prefkd] spine_layers in pyproject.toml"


def test_the_spine_imports_downward_only():
    assert upward_edges() == []


def test_an_upward_import_is_found(tmp_path):
    for name in ("pipeline", "precompute", "train", "evaluate", "generate", "report", "trainers", "losses",
                 "preference_datasets", "utils"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "prefkd").mkdir()
    (tmp_path / "prefkd" / "x.py").write_text("def f():\n    import trainers\n")
    (tmp_path / "trainers.py").write_text("from train import main\n")
    (tmp_path / "train.py").write_text("import evaluate\n")  # a sibling
    assert upward_edges(str(tmp_path)) == [("prefkd/x.py", "trainers"), ("train.py", "evaluate"),
                                           ("trainers.py", "train")]
