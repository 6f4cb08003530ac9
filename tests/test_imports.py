"""dsjax's import graph has no cycle: a lower module never imports a higher one, not even inside a function."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / 'dsjax'


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the dsjax modules it imports anywhere in its body (top level or inside functions)}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from dsjax.a import b` imports dsjax.a.b when that is a module, else a name of dsjax.a.
                candidates = [f'{node.module}.{alias.name}' for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
        # `from dsjax.a import b` of a module b also names the package dsjax.a: packages are empty here.
        graph[name] = {t for t in targets if modules[t].name != '__init__.py'}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = 'grey'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == 'grey':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 'black'
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_function_level_imports_are_edges():
    graph = import_graph()
    assert 'dsjax.train.loop' in graph['dsjax.stages'] and len(graph) > 40


def test_dsjax_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
