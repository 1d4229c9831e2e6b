"""salcompile: compile any PyTorch model to train with SAL (backprop-free, feedback alignment).

    sal = salcompile.transform(model)                       # FA by default
    sal = salcompile.transform(model, example_inputs=(x,), feedback="dfa")
    print(salcompile.plan(sal))

The names below are imported on first use (PEP 562), so `import salcompile` itself does not import
torch and the command line answers --help / --version at once. The custom ops (salcompile.ops,
what a reloaded export archive needs to run and to keep training with FA) are still registered
whenever torch is there: at `import salcompile` if torch is imported already, else right after
torch's own import finishes (a one-shot import hook), and by every salcompile module that runs
them.
"""
import importlib as _importlib
import sys as _sys
import types as _types

from .errors import SalcompileError

__version__ = "0.1.0"
__all__ = ["SALConfig", "SALModule", "SalcompileError", "transform", "plan", "feedback_matrices",
           "compile", "metrics", "save", "load", "routing_stats", "reset_routing_stats", "distributed", "export_onnx", "export_ort_training",
           "export_train_step", "TrainStepSession", "__version__"]

# public name -> the submodule defining it (None: the name is that submodule)
_LAZY = {
    "SALConfig": "config",
    "SALModule": "module", "feedback_matrices": "module",
    "transform": "pipeline", "plan": "pipeline",
    "compile": "backends",
    "save": "archive", "load": "archive",
    "routing_stats": "routing", "reset_routing_stats": "routing",
    "export_onnx": "onnx", "export_ort_training": "onnx", "export_train_step": "onnx",
    "TrainStepSession": "onnx",
    "metrics": None, "distributed": None,
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _LAZY[name]
    module = _importlib.import_module(f"{__name__}.{where or name}")
    value = module if where is None else getattr(module, name)
    globals()[name] = value   # later look-ups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Keeps `salcompile.plan` the function: importing the submodule salcompile/plan.py sets the
    package attribute `plan` to that module, which would hide pipeline.plan (the eager package
    set the function after its submodules, with the same effect)."""

    def __setattr__(self, name, value):
        if isinstance(value, _types.ModuleType) and _LAZY.get(name) not in (None, name) \
                and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def _register_ops():
    from . import ops  # noqa: F401  (registers the salcompile:: custom ops)


class _RegisterOpsAfterTorch:
    """A one-shot meta path finder: when torch is first imported, its module runs as usual and
    salcompile.ops is imported right after, so `import salcompile; import torch;
    torch.export.load("m.sal.pt2")` finds the ops as it did when `import salcompile` imported
    torch itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        _unhook()
        import importlib.util
        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegisterOps(spec.loader)
        return spec

    def invalidate_caches(self):
        pass


class _ThenRegisterOps:
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader   # torch's module shows its own loader afterwards
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        try:
            _register_ops()
        except Exception as exc:   # never break `import torch`; salcompile's modules re-raise it
            import warnings
            warnings.warn(f"salcompile could not register its custom ops after importing torch: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


_HOOK = None


def _unhook():
    global _HOOK
    if _HOOK is not None and _HOOK in _sys.meta_path:
        _sys.meta_path.remove(_HOOK)
    _HOOK = None


if "torch" in _sys.modules:
    _register_ops()
else:
    _HOOK = _RegisterOpsAfterTorch()
    _sys.meta_path.insert(0, _HOOK)
