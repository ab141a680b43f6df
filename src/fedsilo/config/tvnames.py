"""torchvision's classification models and their weights, by name, without importing it.

A configuration naming ``tv:ARCH`` is checked where every configuration is: before any
rank imports torch (about 4 s and 0.8 GB per rank), so that a typo is one line within a
second.  The names are read from torchvision's own source (the functions it registers with
``@register_model()`` in ``torchvision/models/*.py``, and the members of the weights enum
each one's ``weights`` parameter names), which is what ``torchvision.models.list_models``
and ``get_model_weights`` return once it is imported (``tests/unit/test_models_torchvision``
holds them equal).  Where the source cannot be read (a frozen or zipped install), the check
imports torchvision instead.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path

from fedsilo.errors import ConfigError

PREFIX = "tv:"


def _models_dir() -> Path | None:
    spec = importlib.util.find_spec("torchvision")  # finds the package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if folder.is_dir() else None


def _decorated_name(node: ast.FunctionDef) -> str | None:
    """The name ``node`` is registered under, if ``@register_model(...)`` decorates it."""
    for decorator in node.decorator_list:
        call = decorator if isinstance(decorator, ast.Call) else None
        target = call.func if call is not None else decorator
        if isinstance(target, ast.Name) and target.id == "register_model":
            for keyword in call.keywords if call is not None else []:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
            return node.name
    return None


def _weights_class(node: ast.FunctionDef) -> str | None:
    """The enum named by ``weights: Optional[X_Weights]`` (or ``X_Weights | None``)."""
    for arg in node.args.args + node.args.kwonlyargs:
        if arg.arg != "weights" or arg.annotation is None:
            continue
        for part in ast.walk(arg.annotation):
            if isinstance(part, ast.Name) and part.id.endswith("_Weights"):
                return part.id
    return None


def _members(node: ast.ClassDef) -> tuple[str, ...]:
    names = []
    for statement in node.body:
        if isinstance(statement, ast.Assign):
            names += [t.id for t in statement.targets if isinstance(t, ast.Name)]
    return tuple(n for n in names if not n.startswith("_"))


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, tuple[str, ...]] | None:
    """``{arch: weight names}`` of torchvision's classification models, from its source;
    None when that cannot be read (then :func:`check_name` imports torchvision)."""
    folder = _models_dir()
    if folder is None:
        return None
    found: dict[str, tuple[str, ...]] = {}
    for file in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return None
        enums = {node.name: _members(node) for node in tree.body
                 if isinstance(node, ast.ClassDef) and node.name.endswith("_Weights")}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and (name := _decorated_name(node)):
                enum = _weights_class(node)
                found[name] = enums.get(enum, ()) if enum else ()
    return found or None


def _imported() -> dict[str, tuple[str, ...]]:
    import torchvision.models

    return {arch: tuple(torchvision.models.get_model_weights(arch).__members__)
            for arch in torchvision.models.list_models(module=torchvision.models)}


def check_name(name: str) -> str:
    """The torchvision architecture of ``tv:ARCH``, or a ConfigError with the close names.

    >>> check_name("tv:resnet50")
    'resnet50'
    >>> check_name("tv:resnet05")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedsilo.errors.ConfigError: ... 'resnet05' (did you mean tv:resnet50...
    """
    known = sorted(catalogue() or _imported())
    arch = name[len(PREFIX):]
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        raise ConfigError(f"config key 'model.name': torchvision has no classification model "
                          f"{arch!r}" + (f" (did you mean {', '.join(PREFIX + c for c in close)}?)"
                                         if close else "")
                          + f"; known: {', '.join(known)}")
    return arch


def check_weights(arch: str, weights: str) -> None:
    """A ConfigError unless ``weights`` (``IMAGENET1K_V2``, ``DEFAULT``) is one of ``arch``'s.

    >>> check_weights("resnet18", "IMAGENET1K_V1")
    >>> check_weights("resnet18", "IMAGENET1K_V9")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedsilo.errors.ConfigError: config key 'model.weights': ... known: IMAGENET1K_V1, DEFAULT (or...
    """
    known = (catalogue() or _imported()).get(arch, ())
    if weights not in known:
        raise ConfigError(f"config key 'model.weights': {arch} has no weights {weights!r}; "
                          f"known: {', '.join(known)} (or a path to a .pth file)")
