"""Run in the sandbox with a module's name as stdin (or a class's: module.Class): prints its
public names as JSON, {name: [kind, detail]}, with signatures; submodules a package lists."""
import importlib, inspect, json, pkgutil, sys
sys.stdout, out = sys.stderr, {}  # what the module prints as it is imported goes to stderr
name = sys.stdin.read()
try:
    target = importlib.import_module(name)
except ImportError:  # a class in a module
    module, _, attribute = name.rpartition(".")
    target = getattr(importlib.import_module(module), attribute)
names = dict(vars(target)) if inspect.ismodule(target) else {n: getattr(target, n, None) for n in dir(target)}
for name, value in names.items():
    kind = "import" if inspect.ismodule(value) else "class" if isinstance(value, type) \
        else "function" if callable(value) else "attribute"
    kind = "method" if kind == "function" and isinstance(target, type) else kind
    try:
        word = "def" if kind in ("function", "method") else "class" if kind == "class" else None
        detail = word and f"{word} {name}{inspect.signature(value)}"[:300]  # keyword parameters too
    except Exception:  # no signature to tell (or it fails to make one)
        detail = None
    if not name.startswith("_"):
        out[name] = (kind, detail)
for sub in pkgutil.iter_modules(getattr(target, "__path__", None) or []):
    if not sub.name.startswith("_"):
        out.setdefault(sub.name, ("import", f"module {target.__name__}.{sub.name}"))
print(json.dumps(out), file=sys.__stdout__)
