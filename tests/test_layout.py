"""The repo's floors (who may import whom): lower modules never import the scripts above them, and no
module imports itself back through others. Imports inside functions count too."""

import ast
import glob
import os

from conftest import ROOT

# each module may import only modules on lower floors (scripts may also import other scripts, without cycles)
FLOORS = {
    "data": 0, "model": 0, "optim": 0,  # ground
    "distributed": 1,  # processes and devices: builds models and optimizers for the micro-batch search
    "checkpoint": 2, "runlog": 2,  # machinery
}
SCRIPT = 3  # every other top-level module: train_gpt2, hellaswag, ema, plot, ablate, fineweb_edu, bench/...


def local_imports():
    """{module: set of top-level modules of this repo it imports}, for every .py at the top and in bench/."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    ours = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for path in paths:
        tree = ast.parse(open(path).read(), path)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        name = os.path.relpath(path, ROOT).removesuffix(".py").replace(os.sep, "/")
        graph[name] = names & ours - {name}
    return graph


def test_lower_floors_never_import_higher_ones():
    graph = local_imports()
    assert {"train_gpt2", "checkpoint", "runlog", "distributed", "hellaswag"} <= graph.keys()
    wrong = [(m, dep) for m, deps in graph.items() for dep in deps
             if m in FLOORS and FLOORS.get(dep, SCRIPT) >= FLOORS[m]]
    assert not wrong, f"(module, what it imports from its own floor or above): {wrong}"


def test_no_import_cycles():
    graph = local_imports()
    state = {}  # module -> "visiting" | "done"

    def visit(m, path):
        if state.get(m) == "visiting":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) is None:
            state[m] = "visiting"
            for dep in sorted(graph.get(m, ())):
                visit(dep, path + [m])
            state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
