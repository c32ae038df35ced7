"""The house's floors, read from the source: no import circle, no import from a lower floor to a higher one.

Every `import` counts, at module level or inside a function (a function-local import hides an arrow, it does
not remove it). The one exception is the command table (trainer/registry.py, trainer/cli.py): it names every
command and imports the chosen one. docs/architecture.md draws the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: low -> high; a module may import its own floor and the floors below it
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("kernels",)),
    (
        "foundation",
        (
            "trainer",
            "trainer.errors",
            "trainer.fileio",
            "trainer.config",
            "trainer.launcher",
            "trainer.preemption",
            "trainer.assets",
            "trainer.jobarray",
            "trainer.registry",
            "trainer.runlock",
        ),
    ),
    ("data", ("trainer.data",)),
    ("models", ("trainer.models",)),
    (
        "run",
        (
            "trainer.recipes",
            "trainer.engine",
            "trainer.checkpoint",
            "trainer.runlog",
            "trainer.memory",
            "trainer.loop",
            "trainer.preflight",
            "trainer.health",
        ),
    ),
    ("pipeline", ("trainer.pipeline",)),
    ("slurm", ("trainer.slurm",)),
    ("commands", ("trainer.stages", "trainer.slurm.task", "trainer.slurm.__main__", "trainer.cli")),
]
COMMAND_TABLE = ("trainer.registry", "trainer.cli")


def modules() -> dict[str, Path]:
    found = {}
    for top in ("trainer", "kernels"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def floor(module: str) -> int:
    """The highest-numbered floor whose prefix matches most specifically."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS (and docs/architecture.md)")
    return best


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_floor_to_a_higher_one():
    graph = import_graph()
    up = [
        f"{a} ({FLOORS[floor(a)][0]}) -> {b} ({FLOORS[floor(b)][0]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if floor(b) > floor(a) and a not in COMMAND_TABLE
    ]
    assert up == []


def test_kernels_is_a_leaf():
    graph = import_graph()
    assert not [
        (a, b)
        for a, targets in graph.items()
        if a.startswith("kernels")
        for b in targets
        if not b.startswith("kernels")
    ]


def test_the_checks_can_fail():
    """The circle finder and the floor rule on a made-up graph (so a green run means something)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor("trainer.data.tasks") < floor("trainer.models.zoo") < floor("trainer.stages.pretrain")
    assert floor("trainer.slurm.task") > floor("trainer.slurm.sbatch")
    with pytest.raises(AssertionError, match="on no floor"):
        floor("elsewhere.module")


def test_every_command_is_in_the_registry_and_resolves():
    """One table: the CLI's commands are the registry's; each entry module and recipe class exists."""
    from trainer import cli, registry

    assert list(cli.COMMANDS) == [c.name for c in registry.COMMANDS]
    for c in registry.COMMANDS:
        module = registry.entry_module(c.name)
        assert callable(module.add_arguments) and callable(module.main), c.name
        if c.recipe:
            assert registry.recipe_class(c.name).__name__.endswith("Recipe")
        if c.script:
            assert (ROOT / "slurm" / c.script).is_file(), c.script


def test_recipe_classes_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from trainer import registry; "
        "[registry.recipe_class(n) for n in registry.RECIPE_STAGES + ('pipeline',)]; "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def undocumented_local_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function with no comment saying why. A comment on an import's line
    covers that import; a comment on the line just above an import covers it and the imports after it in the same
    block (consecutive import statements, blank lines between them allowed)."""
    lines = source.splitlines()

    def has_comment(lineno: int) -> bool:
        return 0 < lineno <= len(lines) and "#" in lines[lineno - 1]

    def comment_line(lineno: int) -> bool:
        return 0 < lineno <= len(lines) and lines[lineno - 1].lstrip().startswith("#")

    found = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for parent in ast.walk(fn):
            for field in ("body", "orelse", "finalbody", "handlers"):
                statements = getattr(parent, field, None)
                if not isinstance(statements, list):
                    continue
                covered = False
                for stmt in statements:
                    if not isinstance(stmt, ast.Import | ast.ImportFrom):
                        covered = False
                        continue
                    covered = covered or comment_line(stmt.lineno - 1)
                    if not (covered or has_comment(stmt.lineno)):
                        name = stmt.module if isinstance(stmt, ast.ImportFrom) else stmt.names[0].name
                        found.add((stmt.lineno, "." * getattr(stmt, "level", 0) + (name or "")))
    return sorted(found)


def test_function_local_imports_say_why():
    """An import inside a function hides a cost or a circle: it stays there only with a `# deferred: why` comment
    (heavy or optional dependency off a light path, a command's entry, or an import circle); else it goes to the top."""
    missing = [
        f"{path.relative_to(ROOT)}:{line} {module}"
        for _, path in sorted(modules().items())
        for line, module in undocumented_local_imports(path.read_text())
    ]
    assert missing == []


def test_the_local_import_check_can_fail():
    source = (
        "import os\n"
        "def f():\n"
        "    import json\n"  # 3: no comment
        "    # deferred: heavy\n"
        "    import torch\n"
        "\n"
        "    from a import b\n"  # same block as torch: covered by the comment above it
        "    x = 1\n"
        "    from c import d\n"  # 9: a new block, no comment
        "    if x:\n"
        "        import e  # deferred: optional\n"
        "    else:\n"
        "        import g\n"  # 13
        "    y = 2  # a comment about y, not the import\n"
        "    import h\n"  # 15
    )
    assert undocumented_local_imports(source) == [(3, "json"), (9, "c"), (13, "g"), (15, "h")]
