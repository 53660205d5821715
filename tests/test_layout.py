"""The package's shape: the command-line modules only parse and call; training imports none of them."""

import ast

from .conftest import REPO


def _functions(module: str) -> set[str]:
    tree = ast.parse((REPO / "ddpm_hf" / f"{module}.py").read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_the_commands_only_parse_and_call():
    assert _functions("sample") == {"parse_args", "main"}
    assert _functions("evaluate") == {"parse_args", "training_config_of", "main"}
    assert _functions("compare") == {"parse_args", "main"}


def test_the_sampling_command_names_every_sampler_of_the_library():
    from ddpm_hf.generation import SCHEDULERS
    from ddpm_hf.sample import SCHEDULER_NAMES

    assert sorted(SCHEDULERS) == sorted(SCHEDULER_NAMES)


def _package_imports(module: str) -> set[str]:
    """The ddpm_hf modules ``module`` imports, at any depth and wherever in its code (read, not run)."""
    seen, todo = set(), [module]
    while todo:
        tree = ast.parse((REPO / "ddpm_hf" / f"{todo.pop()}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                for name in names:
                    if name not in seen and (REPO / "ddpm_hf" / f"{name}.py").is_file():
                        seen.add(name)
                        todo.append(name)
    return seen


def test_training_imports_no_command_line_module():
    reached = _package_imports("training")
    assert {"run", "step", "maintenance", "generation", "scoring"} <= reached  # the walk does find the library
    assert not reached & {"sample", "evaluate", "cli"}


def test_no_function_of_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted((REPO / "ddpm_hf").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
