"""lowbit's Python modules import only downward, through a fixed order of layers, and never in a cycle.

Imports inside functions count as much as those at the top of a file. Within a layer modules may import each
other, as long as no cycle forms.
"""

import ast
from pathlib import Path

import lowbit

PACKAGE = Path(lowbit.__file__).parent
LAYERS = [  # lowest first
    ["_C", "formats", "data"],                # the format reference, the extension, calibration text
    ["tiled", "ops"],                         # the CUDA tile layout (pure tensor code); the op table
    ["weight"],                               # QuantizedWeight
    ["quantize"],                             # round-to-nearest primitives
    ["nn"],                                   # QuantLinear, the module swap
    ["tokenizer", "models", "models.llama"],  # the model
    ["awq", "cpu_decode"],                    # AWQ on one block's view; the fused CPU decode step
    ["gptq"],                                 # GPTQ of one linear (after AWQ's scales, for awq+gptq)
    ["budget"],                               # per-layer errors and the choice of formats for a size budget
    ["io", "io.hf", "io.safetensors_io", "io.atomic", "io.gguf", "io.checkpoint", "io.autoawq", "io.inspect",
     "io.loading", "io.fetch"],
    ["calibration"],                          # the pipeline: block views, sources, methods per block, the budget's passes
    ["pipeline", "eval", "generate", "engine"],  # orchestration; engine: continuous batching over generate
    ["bench", "cli", "demo", "server", "__init__"],  # entry points; server: the HTTP API of `lowbit serve`
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def resolve(name: str) -> str | None:
    """A dotted name inside lowbit -> the module it denotes (a name imported from a module -> that module)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in LAYER_OF:
            return candidate
        parts.pop()
    return None


def imports_of(path: Path) -> set[str]:
    me = module_name(path)
    package = me.split(".")[:-1] if path.name != "__init__.py" else me.split(".")
    if me == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name[len("lowbit."):] for a in node.names if a.name.startswith("lowbit.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                base_name = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("lowbit"):
                base_name = node.module[len("lowbit."):] if node.module != "lowbit" else ""
            else:
                continue
            for alias in node.names:
                found.add(f"{base_name}.{alias.name}" if base_name else alias.name)
    return {m for m in map(resolve, found) if m is not None and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(graph()) <= set(LAYER_OF), sorted(set(graph()) - set(LAYER_OF))


def test_imports_point_down():
    wrong = [f"{m} (layer {LAYER_OF[m]}) imports {d} (layer {LAYER_OF[d]})"
             for m, deps in graph().items() for d in deps if LAYER_OF[d] > LAYER_OF[m]]
    assert not wrong, wrong


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
