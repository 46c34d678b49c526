"""A stand-in for Hugging Face ``datasets``, put on PYTHONPATH when the tests run llm-compressor.

llm-compressor imports ``datasets`` at start-up but its data-free path (``model_free_ptq``) never uses it, and
``make setup`` installs it without its dependencies. Any name asked of this package, or of any submodule, is an
empty class; nothing here does anything.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "4.0.0"


class _Placeholder:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def _placeholder(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Placeholder,), {})


class _EmptyModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []  # a package, so that its submodules can be imported too

    def __getattr__(self, name: str) -> type:
        return _placeholder(name)


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return _EmptyModule(spec.name)

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        pass


sys.meta_path.insert(0, _Submodules())


def __getattr__(name: str) -> type:
    return _placeholder(name)
