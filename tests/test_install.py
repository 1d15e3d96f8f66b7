"""circuitlab works however a user installs it: editable, from a wheel, run from any folder,
beside the PyPI package called ``kernels`` (which transformers pulls in)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _decoy(tmp_path: Path) -> dict:
    """An environment whose first path entry holds a foreign top-level ``kernels`` package,
    as the PyPI one is: the top-level name ``kernels`` resolves to it before anything of ours."""
    pkg = tmp_path / "decoy" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("DECOY = True\n")
    env = dict(os.environ, PYTHONPATH=str(pkg.parent))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, cwd, env, timeout=600):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_pyproject_lists_every_package_folder():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(("circuitlab",) + p.parent.relative_to(ROOT / "circuitlab").parts)
               .rstrip(".") for p in (ROOT / "circuitlab").rglob("__init__.py")}
    on_disk |= {".".join(("circuitlab", "kernels") + p.parent.relative_to(ROOT / "kernels")
                         .parts) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert set(cfg["packages"]) == on_disk
    assert cfg["package-dir"] == {"circuitlab.kernels": "kernels"}


def test_circuitlab_kernels_is_ours_beside_a_foreign_kernels(tmp_path):
    code = ("import importlib, circuitlab.kernels as ck\n"
            "kernels = importlib.import_module('kernels')  # the foreign top-level one\n"
            "from circuitlab.explain import losses\n"
            "print(getattr(kernels, 'DECOY', False), ck.__file__)\n"
            "assert losses.activation_matching is ck.activation_matching\n"
            "assert issubclass(ck.KernelInputError, __import__('circuitlab').CircuitlabError)\n")
    r = _run([sys.executable, "-c", code], tmp_path, _decoy(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    decoy, path = r.stdout.split()
    assert decoy == "True"                      # the collision is real in this process
    assert Path(path).read_bytes() == (ROOT / "kernels" / "__init__.py").read_bytes()


def test_console_script_runs_the_main_job_outside_the_checkout(tmp_path):
    exe = BIN / "circuitlab"
    assert exe.is_file(), f"no console script at {exe}: install with pip install -e '.[dev]'"
    out = tmp_path / "runs" / "coffee"
    r = _run([str(exe), "explain", "--model", "efficientnet_lite0", "--image", "coffee",
              "--out", str(out), "--steps", "3"], tmp_path, _decoy(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("coffee: espresso kept=") and f"wrote {out}" in r.stdout
    assert {p.name for p in out.iterdir()} == {"mask.png", "explanation.png", "overlay.png",
                                               "metrics.json"}


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for folder in ("circuitlab", "kernels"):
        for p in (ROOT / folder).rglob("*.py"):
            dst = src / p.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    # built without the decoy: the PyPI kernels registers a setuptools plugin the decoy hides
    env = dict(os.environ)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
                    str(src)], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "w").glob("circuitlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "circuitlab/kernels/__init__.py" in names
    assert "circuitlab/kernels/ops/activation_matching.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    r = _run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    env = _decoy(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    r = _run([sys.executable, "-m", "circuitlab.cli", "predict", "--model",
              "efficientnet_lite0", "--image", "coffee", "--topk", "1"], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "espresso" in r.stdout
    r = _run([sys.executable, "-c", "import circuitlab.kernels as k; print(k.__file__)"],
             tmp_path, env)
    assert Path(r.stdout.strip()).is_relative_to(site)


@pytest.mark.parametrize("name", ["timm", "nnsight", "transformers"])
def test_major_releases_are_capped(name):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.split(">")[0].split("<")[0].strip() == name)
    assert "<" in spec, spec


def _closure(name: str, extras=()) -> dict:
    """Installed distributions ``name`` needs (with ``extras``), transitively: name -> version."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = {}, [(name, tuple(extras))]
    while todo:
        dist_name, dist_extras = todo.pop()
        dist = metadata.distribution(dist_name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and not dist_extras:
            continue
        seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in dist_extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_the_lock_pins_the_installed_closure():
    from packaging.utils import canonicalize_name
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, version = line.split("==")
            lock[canonicalize_name(pkg)] = version.strip()
    closure = _closure("circuitlab", ["dev"])
    closure.pop("circuitlab")
    assert {"torch", "torchvision", "triton", "timm", "nnsight", "transformers",
            "kernels"} <= set(closure)
    missing = sorted(set(closure) - set(lock))
    assert not missing, f"not in constraints.txt (refresh the lock, see its header): {missing}"
    drift = {k: (v, lock[k]) for k, v in closure.items() if lock[k] != v}
    assert not drift, f"installed vs locked: {drift}"
    assert (lock["torch"], lock["torchvision"], lock["triton"]) == ("2.14.1", "0.29.1", "3.8.0")
