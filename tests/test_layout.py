"""The package's shape: the command-line modules only parse and call; training imports none of them."""

import ast
import subprocess
import sys

from .conftest import REPO, cli_env


def _functions(module: str) -> set[str]:
    tree = ast.parse((REPO / "ddpm_hf" / f"{module}.py").read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_the_commands_only_parse_and_call():
    assert _functions("sample") == {"parse_args", "main"}
    assert _functions("evaluate") == {"parse_args", "training_config_of", "main"}


def test_the_sampling_command_names_every_sampler_of_the_library():
    from ddpm_hf.generation import SCHEDULERS
    from ddpm_hf.sample import SCHEDULER_NAMES

    assert sorted(SCHEDULERS) == sorted(SCHEDULER_NAMES)


def test_training_imports_no_command_line_module():
    code = "import sys, ddpm_hf.training; print(sorted(m for m in sys.modules if m in ('ddpm_hf.sample', 'ddpm_hf.evaluate', 'ddpm_hf.cli')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_no_function_of_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted((REPO / "ddpm_hf").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
