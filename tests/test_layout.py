"""The shape of the repository (scripts over libraries), read from the code's own imports with ast:
a script is a file with a __main__ guard and no library has one; no module imports a script; model.py needs only
the standard library and torch at import; the project's modules import each other without a circle."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "classify", "annotate", "evaluate", "report", "bench", "data.prepare"}


def modules():
    """{module name: path} of the project's code: the top level and data/ (the sample generators aside)."""
    out = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    out["data"] = os.path.join(ROOT, "data", "__init__.py")
    out.update({f"data.{f[:-3]}": os.path.join(ROOT, "data", f) for f in os.listdir(os.path.join(ROOT, "data"))
                if f.endswith(".py") and f != "__init__.py"})
    return out


def imports(path, top_level_only):
    """The project modules a file imports (at module level only, or anywhere)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names.add(n.module)
            names |= {f"{n.module}.{a.name}" for a in n.names}   # from data import prepare
    return {m for m in names if m in modules()}


def has_main_guard(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_scripts_are_exactly_the_files_with_a_main_guard():
    assert {m for m, p in modules().items() if has_main_guard(p)} == SCRIPTS


def test_no_module_imports_a_script():
    bad = {(m, s) for m, p in modules().items() for s in imports(p, top_level_only=False) & SCRIPTS if s != m}
    assert not bad, f"a module imports a script: {sorted(bad)}"


def test_model_py_needs_only_the_standard_library_and_torch():
    tree = ast.parse(open(os.path.join(ROOT, "model.py"), encoding="utf-8").read())
    top = set()
    for n in tree.body:
        if isinstance(n, ast.Import):
            top |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            top.add(n.module.split(".")[0])
    assert top - {"torch"} <= set(sys.stdlib_module_names), top


def test_no_import_circle_among_the_modules():
    graph = {m: imports(p, top_level_only=True) - {m} for m, p in modules().items()}
    graph["data"] -= {f"data.{x}" for x in ("prepare",)}   # "from data import prepare" is never module-level there
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", f"import circle: {' -> '.join(path + [m, d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
