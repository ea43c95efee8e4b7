"""The API reference is generated from the docstrings, so every public function and class must document its
arguments under ``Args:``, and no docstring may cite a file that is not in the repository."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import lightning_devinterp

ROOT = Path(lightning_devinterp.__file__).resolve().parent


def public_modules():
    for info in pkgutil.walk_packages(lightning_devinterp.__path__, "lightning_devinterp."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def public_callables():
    for module in public_modules():
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                yield f"{module.__name__}.{name}", value


def documented_arguments(docstring: str) -> set[str]:
    """The names listed in the ``Args:`` section of a Google-style docstring."""
    match = re.search(
        r"^\s*Args:\n(.*?)(?:^\s*(?:Returns|Raises|Yields|Example|Examples|Note|Attributes):|\Z)",
        docstring,
        re.S | re.M,
    )
    if match is None:
        return set()
    indents = [len(line) - len(line.lstrip()) for line in match.group(1).splitlines() if line.strip()]
    first = min(indents) if indents else 0
    return {
        re.match(r"\**(\w+)", line.strip()).group(1)
        for line in match.group(1).splitlines()
        if line.strip() and len(line) - len(line.lstrip()) == first
    }


def arguments(value) -> list[str]:
    target = value.__init__ if inspect.isclass(value) else value
    if inspect.isclass(value) and target is object.__init__:
        return []
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


CALLABLES = sorted(public_callables())


@pytest.mark.parametrize(("name", "value"), CALLABLES, ids=[name for name, _ in CALLABLES])
def test_every_argument_of_a_public_callable_is_documented(name, value):
    if inspect.isclass(value) and (issubclass(value, (Exception, Warning)) or getattr(value, "_is_protocol", False)):
        return
    if inspect.isclass(value) and "__dataclass_fields__" in vars(value) and not value.__doc__.count("Args:"):
        # a plain record: its fields are documented in its own docstring as attributes
        assert value.__doc__ and len(value.__doc__) > 40, name
        return
    docstring = inspect.getdoc(value) or ""
    assert docstring, f"{name} has no docstring"
    missing = [argument for argument in arguments(value) if argument not in documented_arguments(docstring)]
    assert not missing, f"{name} does not document {missing} under Args:"


def test_docstrings_cite_only_documentation_that_exists():
    """Code points readers at pages of the repository (docs/, README.md); each page or picture it cites must exist
    there, so nothing cites a file readers cannot open."""
    repository = ROOT.parent
    for folder in ("lightning_devinterp", "tests", "examples", "benchmarks"):
        for path in (repository / folder).rglob("*.py"):
            for cited in re.findall(r"[\w./-]+\.md\b|docs/[\w./-]+\.png", path.read_text()):
                assert (repository / cited).exists(), f"{path} cites {cited}, which does not exist"


def test_ci_runs_the_readme_test_command_and_the_readme_stays_short():
    repository = ROOT.parent
    readme = (repository / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(command for command in commands if "pytest" in command and "[test]" in command)
    assert test_command in (repository / ".ci" / "run").read_text().splitlines()
    assert any("examples/tms.py" in command for command in commands)
    assert len(readme.splitlines()) <= 200
