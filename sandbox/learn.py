"""Run in the sandbox with a module's name as stdin: prints its public names
as JSON, {name: [kind, detail]}, with signatures; submodules a package lists."""
import importlib, inspect, json, pkgutil, sys
sys.stdout, out = sys.stderr, {}  # what the module prints as it is imported goes to stderr
module = importlib.import_module(sys.stdin.read())
for name, value in vars(module).items():
    kind = "import" if inspect.ismodule(value) else "class" if isinstance(value, type) \
        else "function" if callable(value) else "attribute"
    try:
        detail = f"def {name}{inspect.signature(value)}"[:100] if kind == "function" else None
    except (TypeError, ValueError):
        detail = None
    if not name.startswith("_"):
        out[name] = (kind, detail)
for sub in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
    if not sub.name.startswith("_"):
        out.setdefault(sub.name, ("import", f"module {module.__name__}.{sub.name}"))
print(json.dumps(out), file=sys.__stdout__)
