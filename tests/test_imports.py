"""Every peftkit module and every public name can be imported first, in a fresh interpreter.

The rest of the suite imports peftkit in one order; an import cycle only shows when a user's first
import enters it elsewhere (``from peftkit import get_peft_model_state_dict`` once failed on
``peftkit.serialization`` <-> ``peftkit.methods`` and left the method registry half-filled).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# One child process: before each import it forgets every peftkit module (torch stays loaded, so
# this is cheap), which makes each import a first import as far as peftkit's own cycles go.
_CHILD = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    def forget():
        for name in [n for n in sys.modules if n == "peftkit" or n.startswith("peftkit.")]:
            del sys.modules[name]

    def registry_works():
        from peftkit.methods import get_method, list_methods
        get_method("lora")
        return len(list_methods())

    import peftkit
    modules = [m.name for m in pkgutil.walk_packages(peftkit.__path__, "peftkit.")]
    modules = [m for m in modules if not m.endswith("__main__")]
    part, parts = int(sys.argv[1]), int(sys.argv[2])
    total = len(modules)
    modules = modules[part::parts]
    public = list(peftkit.__all__)[part::parts]
    failures, methods = {}, set()
    for name in modules:
        forget()
        try:
            importlib.import_module(name)
            methods.add(registry_works())
        except Exception as err:
            failures[name] = f"{type(err).__name__}: {err}"
    forget()
    exported = importlib.import_module("peftkit")
    for name in public:  # each lazy export's module was imported first above
        try:
            getattr(exported, name)
        except Exception as err:
            failures["peftkit." + name] = f"{type(err).__name__}: {err}"
    print(json.dumps({"modules": len(modules), "total": total, "public": len(public),
                      "methods": sorted(methods), "failures": failures}))
    """
)


def test_every_module_and_public_name_imports_first():
    # Two children, each with every other module: ~0.1 s per first import, ~300 modules.
    parts = 2
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(part), str(parts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in range(parts)
    ]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["failures"] for r in reports] == [{}] * parts
    assert sum(r["modules"] for r in reports) == reports[0]["total"] > 50
    assert sum(r["public"] for r in reports) > 30
    assert len({m for r in reports for m in r["methods"]}) == 1  # the same registry whichever came first


def test_library_code_never_imports_the_cli():
    """Commands are thin files over library functions; the library must work without them."""
    from pathlib import Path

    import peftkit

    root = Path(peftkit.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.parent != root / "cli" and path.name != "__main__.py" and "peftkit.cli" in path.read_text()
    ]
    assert offenders == []
