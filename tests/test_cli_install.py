"""A fresh machine: every package the tests and benchmarks import is in the `test` extra (or
fmrt's own requirements), and `fmrt sample` runs with fmrt's requirements alone."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("matplotlib", "diffusers", "transformers", "peft", "scipy", "hypothesis", "imageio",
            "imageio_ffmpeg", "ftfy", "flash_attn", "pytest")


def _requirements() -> tuple[set, dict]:
    """(install_requires, extras_require) of setup.py, as normalised distribution names."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}

    def names(reqs):
        return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}
    return names(kw["install_requires"]), {k: names(v) for k, v in kw["extras_require"].items()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict:
    """Third-party top-level modules imported by tests/, benchmarks/ and conftest.py -> a file
    importing it."""
    files = [os.path.join(ROOT, "conftest.py")]
    for d in ("tests", "benchmarks"):
        for dirpath, _, fs in os.walk(os.path.join(ROOT, d)):
            files += [os.path.join(dirpath, f) for f in fs if f.endswith(".py")]
    mods = {}
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            for m in (m.split(".")[0] for m in found):
                here = (ROOT, os.path.dirname(path))     # the repository's own modules
                if not any(os.path.exists(os.path.join(d, m + ".py"))
                           or os.path.isdir(os.path.join(d, m)) for d in here):
                    mods.setdefault(m, os.path.relpath(path, ROOT))
    return mods


def test_every_imported_package_is_required():
    base, extras = _requirements()
    wanted = base | extras["test"]
    dists = importlib.metadata.packages_distributions()
    missing = []
    for mod, where in sorted(_imported_modules().items()):
        if mod in sys.stdlib_module_names:
            continue
        names = {_norm(d) for d in dists.get(mod, [mod])}
        if not names & wanted:
            missing.append(f"{mod} ({where})")
    assert not missing, f"imported but in neither install_requires nor the test extra: {missing}"


def test_sample_runs_with_fmrt_requirements_only(tmp_path):
    """The Quickstart's `pip install -e . && fmrt sample`: the optional packages made
    unimportable (None in sys.modules), the command still samples and writes its PNG."""
    code = ("import sys\n"
            f"for m in {OPTIONAL!r}:\n"
            "    sys.modules[m] = None\n"
            "from fmrt.cli import main\n"
            "sys.exit(main(['sample', '--num', '2', '--steps', '2', '--gif']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["fmrt_samples.gif", "fmrt_samples.png"]


def test_ci_runs_the_readme_test_command():
    """.ci/run ends with the README's test command, and what that command needs (pytest-xdist
    for -n) is in the test extra."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    command = re.search(r'^pip install -e "\.\[test\]" && (pytest.*)$', readme, re.M).group(1)
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == command
    if " -n " in f" {command} ":
        assert "pytest-xdist" in _requirements()[1]["test"]
