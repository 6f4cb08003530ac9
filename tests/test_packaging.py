"""Packaging: every package dsjax imports is declared, and CI's constraints file pins versions that the
declared ranges admit (so `.ci/run` tests a set a user's install may get)."""
import ast
import importlib.metadata
import pathlib
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    """Declared requirements by canonical name: install_requires and every extra."""
    lines = [line.split('#')[0].strip() for line in (REPO / 'requirements.txt').read_text().splitlines()]
    found = [Requirement(line) for line in lines if line]
    setup = (REPO / 'setup.py').read_text()
    extras = re.search(r'extras_require=\{(.*?)\n    \}', setup, re.S).group(1)
    found += [Requirement(r) for r in re.findall(r'"([A-Za-z][^"]*)"', extras) if r not in ('data', 'test')]
    return {canonicalize_name(r.name): r for r in found}


def _imported_packages() -> set[str]:
    """Top-level packages the dsjax sources import (stdlib and dsjax itself left out)."""
    names = set()
    for path in (REPO / 'dsjax').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split('.')[0])
    return names - set(sys.stdlib_module_names) - {'dsjax'}


def test_every_import_is_declared():
    declared = _requirements()
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for package in sorted(_imported_packages()):
        names = {canonicalize_name(d) for d in distributions.get(package, [package])}
        if not names & set(declared):
            missing.append(f'{package} ({", ".join(sorted(names))})')
    assert not missing, f'imported by dsjax but declared neither in requirements.txt nor in an extra: {missing}'


def test_constraints_pin_versions_the_ranges_admit():
    declared = _requirements()
    pins = {}
    for line in (REPO / '.ci' / 'constraints.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            name, version = line.split('==')
            pins[canonicalize_name(name)] = version
    assert not set(declared) - set(pins), f'declared but not pinned for CI: {sorted(set(declared) - set(pins))}'
    for name, requirement in declared.items():
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(requirement), pins[name])
    # Bounds where dsjax relies on a library's internals, and no exact torch pin for users.
    assert declared['orbax-checkpoint'].specifier.contains('0.13.0') is False
    assert declared['grain'].specifier.contains('0.3.0') is False
    assert not any(s.operator == '==' for s in declared['torch'].specifier)
    assert '-c .ci/constraints.txt' in (REPO / '.ci' / 'run').read_text()
