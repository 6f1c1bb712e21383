"""The shape of train_gpt.py (short functions, no deep nesting, short lines), the README's environment-variable
table against the settings the code reads, and the typo check on settings."""
import ast
import os
import re

import pytest

from conftest import ROOT, SCRIPT, run_script

import train_gpt as tg

SRC = open(SCRIPT, encoding="utf-8").read()


def functions(tree):
    """(function node, depth of enclosing functions) for every def and lambda; class bodies do not count."""
    out = []

    def walk(node, depth):
        for child in ast.iter_child_nodes(node):
            fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if fn:
                out.append((child, depth))
            walk(child, depth + fn)

    walk(tree, 0)
    return out


def test_no_function_longer_than_100_lines_and_no_nested_nested_function():
    fns = functions(ast.parse(SRC))
    long = [(f.name, f.end_lineno - f.lineno + 1) for f, _ in fns
            if not isinstance(f, ast.Lambda) and f.end_lineno - f.lineno + 1 > 100]
    assert not long, f"functions over 100 lines: {long}"
    deep = [(getattr(f, "name", "lambda"), f.lineno) for f, d in fns if d >= 2]
    assert not deep, f"functions nested inside nested functions: {deep}"


def test_lines_at_most_120_characters_unless_a_long_string_literal():
    bad = [i for i, line in enumerate(SRC.splitlines(), 1) if len(line) > 120
           and not re.search(r'f?"[^"]{60,}"', line)]  # a message that would be harder to read split
    assert not bad, f"lines over 120 characters without a long string literal: {bad}"


def test_file_size_limits():
    assert SRC.count("\n") <= 1500


def readme_variables():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1]))
    return names


def test_readme_environment_table_matches_the_settings(tiny_env):
    tg.SETTINGS.clear()
    tg.Hyperparameters()
    documented = readme_variables()
    assert tg.SETTINGS - documented == set(), "read but not documented in README.md"
    assert documented - tg.SETTINGS == set(), "documented in README.md but never read"


@pytest.mark.parametrize("name, suggestion", [("ITERATION", "ITERATIONS"), ("num_layers", "NUM_LAYERS"),
                                              ("TTT_ENABLE", "TTT_ENABLED")])
def test_typo_of_a_setting_stops_the_run_naming_it(tiny_env, monkeypatch, name, suggestion):
    monkeypatch.setenv(name, "100")
    with pytest.raises(tg.UserError, match=f"{name} is not a setting; did you mean {suggestion}"):
        tg.Hyperparameters()


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS",
                                  "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "TORCH_LOGS", "TORCHINDUCTOR_CACHE_DIR",
                                  "PYTORCH_CUDA_ALLOC_CONF", "TORCHELASTIC_RUN_ID", "HOSTNAME", "PG_DATA_DIR"])
def test_system_variables_are_never_flagged(tiny_env, monkeypatch, name):
    monkeypatch.setenv(name, "1")
    tg.Hyperparameters()


def test_typo_subprocess_exits_2_with_one_line(tiny_env, tmp_path):
    r = run_script(dict(tiny_env, ITERATION="100"), tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: ITERATION is not a setting; did you mean ITERATIONS? (rename or unset it)"]
    assert not (tmp_path / "logs").exists()
