"""Every public function and method of jcnn carries type hints on each parameter and its return.

The public surface is what the packages export: the ``__all__`` of ``jcnn`` and, recursively, of
each subpackage and public module it exports (``jcnn.nn``, ``jcnn.data.augment``,
``jcnn.train.schedules``...). A function must annotate every parameter (``*args`` and
``**kwargs`` too) and its return; a class must do so for each public method written in jcnn
(``__call__`` and ``__init__`` included, ``self``/``cls`` excepted). Methods that Flax, NNX or
``dataclasses`` generate (the ``__init__`` of a Linen module, ``_replace`` of a NamedTuple) are
not jcnn's and are skipped.
"""

import functools
import importlib
import inspect
import pathlib
import types

import pytest

import jcnn

JCNN_DIR = pathlib.Path(jcnn.__file__).resolve().parent
SUBPACKAGES = ["functional", "init", "nn", "nnx", "models", "data", "analysis", "train", "native"]


def _written_in_jcnn(function):
    """Whether ``function``'s code lives in a source file of the jcnn package."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    return JCNN_DIR in pathlib.Path(code.co_filename).resolve().parents


def _python_function(obj):
    """The plain Python function behind ``obj`` (through jit, custom_jvp, functools wrappers)."""
    for _ in range(10):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            return None  # its signature is the wrapped function's, checked where that is exported
        elif isinstance(obj, types.FunctionType):
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is None or not callable(wrapped):
                return obj
            obj = wrapped
        elif hasattr(obj, "__wrapped__"):
            obj = obj.__wrapped__
        elif hasattr(obj, "fun"):  # jax.custom_jvp / custom_vjp
            obj = obj.fun
        else:
            return None
    return None


def _missing_hints(function):
    """The parts of ``function``'s signature without an annotation: parameter names and 'return'."""
    missing = []
    parameters = list(inspect.signature(function, follow_wrapped=False).parameters.values())
    for index, parameter in enumerate(parameters):
        if index == 0 and parameter.name in ("self", "cls"):
            continue
        if parameter.annotation is inspect.Parameter.empty:
            missing.append(f"parameter {parameter.name}")
    if "return" not in function.__annotations__:
        missing.append("return")
    return missing


def _is_public_method(name):
    return not name.startswith("_") or name in ("__init__", "__call__")


def _class_methods(cls):
    """``(name, function)`` of the public methods of ``cls`` written in jcnn, its jcnn bases too."""
    seen = set()
    for klass in cls.__mro__:
        for name, attribute in vars(klass).items():
            if name in seen or not _is_public_method(name):
                continue
            seen.add(name)
            if isinstance(attribute, property):
                attribute = attribute.fget
            elif isinstance(attribute, functools.cached_property):
                attribute = attribute.func
            function = _python_function(attribute)
            if function is not None and _written_in_jcnn(function):
                yield name, function


def _public_modules():
    """Every jcnn module reachable through ``__all__`` from ``jcnn``, each once."""
    pending = [jcnn]
    seen = {}
    while pending:
        module = pending.pop()
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if isinstance(value, types.ModuleType) and value.__name__.startswith("jcnn"):
                pending.append(value)
    return [seen[name] for name in sorted(seen)]


def _offenders():
    """``module.Name[.method]: parameter x`` (or ``: return``) for each hint missing."""
    offenders = set()
    checked = set()
    for module in _public_modules():
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                continue
            if inspect.isclass(value):
                if not value.__module__.startswith("jcnn"):
                    continue
                owner = f"{value.__module__}.{value.__qualname__}"
                for method_name, function in _class_methods(value):
                    checked.add(function)
                    for part in _missing_hints(function):
                        offenders.add(f"{owner}.{method_name}: {part}")
            elif callable(value):
                function = _python_function(value)
                if function is None or not _written_in_jcnn(function):
                    continue
                checked.add(function)
                for part in _missing_hints(function):
                    offenders.add(f"{function.__module__}.{function.__qualname__}: {part}")
    return sorted(offenders), checked


def test_public_functions_and_methods_are_fully_annotated():
    offenders, _ = _offenders()
    assert not offenders, (
        f"{len(offenders)} missing type hints on jcnn's public API (annotate each parameter and "
        "the return):\n" + "\n".join(offenders)
    )


def test_the_walk_sees_the_public_api():
    """The check above is only as good as its reach: it must see functions, methods and modules."""
    from jcnn import functional as F
    from jcnn import models, nn, nnx, train
    from jcnn.data import augment

    walked = {module.__name__ for module in _public_modules()}
    assert {f"jcnn.{name}" for name in SUBPACKAGES} <= walked, walked
    _, checked = _offenders()
    expected = [
        F.conv,
        F.relu,
        augment.random_crop,
        train.schedules.cosine,
        train.fit,
        vars(nn.Conv)["__call__"],
        nnx.Conv.__init__,
        nnx.Conv.__call__,
        vars(models.ResNet)["__call__"],
        models.resnet18,
        nnx.to_nnx,
    ]
    missing = [
        repr(item)
        for item in expected
        if _python_function(item) is None or _python_function(item) not in checked
    ]
    assert not missing, f"the typing check no longer sees: {missing}"
    # 320 functions and methods today; a walk broken by a refactor would see a handful.
    assert len(checked) > 250, len(checked)


def test_a_missing_hint_is_reported_with_its_place():
    def unannotated(x, *args, y: int = 0, **kwargs):
        return x

    class Module:
        def __call__(self, x: int, train=None) -> int:
            return x

    assert _missing_hints(unannotated) == [
        "parameter x",
        "parameter args",
        "parameter kwargs",
        "return",
    ]
    assert _missing_hints(Module.__call__) == ["parameter train"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_declares_its_public_names(name):
    module = importlib.import_module(f"jcnn.{name}")
    assert getattr(module, "__all__", None), f"jcnn.{name} has no __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"jcnn.{name}.__all__ names {public!r}, which is missing"
