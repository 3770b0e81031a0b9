"""The layout is the architecture: imports flow kernels <- mpcache <- parties <- experiments (never upward), the
library's modules import each other without a cycle, and no source file grows past ~500 lines without saying why
at its top. Static checks (ast), no imports executed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "mpcache", "parties", "experiments"]  # each may import only the layers before it
MAX_LINES = 500


def _sources(*pkgs):
    for pkg in pkgs:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, including `if TYPE_CHECKING:`-free try/if blocks
        nodes = [
            n
            for stmt in tree.body
            for n in ast.walk(stmt)
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[: len(base) - (n.level - 1)]
                name = ".".join(base + ([n.module] if n.module else []))
            else:
                name = n.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in n.names}  # `from pkg import module`
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_never_flow_upward(layer):
    above = LAYERS[LAYERS.index(layer) + 1 :]
    bad = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in _sources(layer)
        for name in sorted(_imports(p, top_level_only=False))
        if name.split(".")[0] in above
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_in_the_library():
    """Module-level imports between mpcache/kernels modules form a DAG (a function-level import breaks no cycle
    rule; it runs after both modules exist)."""
    mods = {_module(p): p for p in _sources("kernels", "mpcache")}
    graph = {m: {n for n in _imports(p, top_level_only=True) if n in mods and n != m} for m, p in mods.items()}
    # a package's __init__ is imported by its modules implicitly: not an edge of theirs
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_long_files_say_why():
    """A source file over ~500 lines states at its top (its docstring or first comment) why it is one file."""
    bad = []
    for p in [*_sources("kernels", "mpcache", "parties", "experiments", "tests"), ROOT / "scripts" / "netem"]:
        text = p.read_text()
        if text.count("\n") > MAX_LINES and "Why one file" not in text[:3000]:
            bad.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines, no 'Why one file' note at its top")
    assert not bad, "\n".join(bad)


def test_both_backends_implement_the_op_set():
    """mpcache.backends.base.Backend is the op set: the plaintext and the secure backend define every op with the
    contract's parameters (in order), so the model and the policies call them without probing."""
    import inspect

    from mpcache.backends.base import OPS, Backend
    from mpcache.backends.plain import PlainBackend
    from mpcache.backends.secure import SecureBackend

    assert len(OPS) >= 24
    for cls in (PlainBackend, SecureBackend):
        assert isinstance(cls.secure, bool), cls
        for op in OPS:
            assert callable(getattr(cls, op, None)), f"{cls.__name__} lacks {op}"
            want = list(inspect.signature(getattr(Backend, op)).parameters)
            got = list(inspect.signature(getattr(cls, op)).parameters)
            assert got[: len(want)] == want, f"{cls.__name__}.{op}{tuple(got)} != contract {tuple(want)}"


def test_the_model_and_policies_do_not_probe_their_backend():
    bad = []
    for p in [*_sources("mpcache/model"), *_sources("mpcache/policies"), ROOT / "mpcache" / "bench.py"]:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) in ("getattr", "hasattr") and n.args:
                target = ast.unparse(n.args[0])
                if target in (
                    "B",
                    "self.B",
                    "backend",
                    "self.backend",
                    "ctx.backend",
                ) or "is_fixed_operand" in ast.unparse(n):
                    bad.append(f"{p.relative_to(ROOT)}:{n.lineno}: {ast.unparse(n)}")
    assert not bad, "\n".join(bad)
