"""The package as others get it: installed from a wheel, or run from a checkout that is not installed.

The tests run against an editable install, which finds any module in the source tree whether or not the
distribution lists it; a package missing from ``setup.cfg`` would only break a real install. So: every
package directory is listed, and the built wheel, imported with nothing of the source tree on the path,
has the presets, the kernels and both adapter plugins. And a checkout on ``PYTHONPATH`` with nothing
installed (how the GPU session script runs on a lent machine) finds its ``adapters/`` folder as the
plugins.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _site_dirs() -> list:
    """This environment's site-packages folders (pure and platform-specific: one folder on most systems)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[key]) for key in ("purelib", "platlib") if Path(paths[key]).is_dir()))


def _listed_packages() -> dict:
    """setup.cfg's packages, each with the source folder it is built from (``package_dir`` mappings)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = [p.strip() for p in cfg["options"]["packages"].split() if p.strip()]
    mapped = {}
    for line in cfg["options"].get("package_dir", "").splitlines():
        if "=" in line:
            name, folder = (part.strip() for part in line.split("=", 1))
            mapped[name] = folder
    return {p: ROOT / mapped.get(p, p.replace(".", os.sep)) for p in packages}


def test_every_package_folder_is_listed_in_setup_cfg():
    listed = _listed_packages()
    assert all((folder / "__init__.py").is_file() for folder in listed.values()), listed
    sources = {ROOT / "snn_localrules", ROOT / "adapters"}
    found = {init.parent for source in sources for init in source.rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found == set(listed.values()), f"not in setup.cfg [options] packages: {sorted(map(str, found - set(listed.values())))}"


def _copy_of_the_tree(tmp_path) -> Path:
    """The checkout as a fresh clone has it: no build/ (setuptools builds in the tree and keeps what an
    earlier build left in build/lib), no egg-info of an editable install, no environments."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results", "runs", ".whl*"))
    return source


#: printed by both probes first: the rules, then ``<framework> <file of its adapter plugin>`` for each
#: framework installed here
_PLUGINS_PROBE = (
    "import importlib.util\n"
    "import snn_localrules as slr\n"
    "from snn_localrules.plugins import plugin_manager\n"
    "print(sorted(slr.rules()))\n"
    "names = dict(plugin_manager().list_name_plugin())\n"
    "for n in ('spikingjelly', 'snntorch'):\n"
    "    if importlib.util.find_spec(n):\n"
    "        print(n, names[n].__file__)\n"
)


def _site_packages_without_this_project(tmp_path) -> Path:
    """This environment's site-packages as links, less this project's own install (its metadata and the
    editable install's path hook): what a machine that has only the dependencies offers."""
    site = tmp_path / "site"
    site.mkdir()
    for folder in _site_dirs():
        for entry in folder.iterdir():
            if not entry.name.startswith(("snn_localrules", "__editable__", "snn-localrules")) \
                    and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


def _run_isolated(tmp_path, package_root: Path, probe: str) -> list:
    """``probe``'s output lines, run by ``python -S`` (no site-packages processing, so no path hook of the
    editable install) with ``package_root`` (an unpacked wheel or a checkout) first on the path and then
    the dependencies, nothing else of this project."""
    site = _site_packages_without_this_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), str(site)])}
    run = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def _assert_plugins(lines: list, adapters_folder: Path) -> list:
    """The rules line and an adapter plugin line per installed framework, each loaded from
    ``adapters_folder``; returns the lines after them."""
    assert lines[0] == "['sltt', 'tp']"
    adapters = [line.split() for line in lines[1:] if line.split()[0] in ("spikingjelly", "snntorch")]
    assert adapters, "neither SpikingJelly nor snnTorch is installed: the adapters were not loaded"
    for name, file in adapters:
        assert file == str(adapters_folder / f"{name}.py"), (name, file)
    return lines[1 + len(adapters):]


def _can_build_wheels() -> bool:
    """pyproject.toml's build requirements without build isolation (the test stays offline): setuptools
    with its own bdist_wheel (70.1+), or an older one with the wheel package."""
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:
        return False
    return (importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
            or importlib.util.find_spec("wheel") is not None)


@pytest.mark.skipif(not _can_build_wheels(), reason="building a wheel needs setuptools 70.1+ or the wheel package")
def test_the_built_wheel_imports_without_the_source_tree(tmp_path):
    source = _copy_of_the_tree(tmp_path)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("snn_localrules-*.whl")
    unpacked = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
        names = archive.namelist()
    assert not any(name.startswith("adapters/") for name in names), "a top-level 'adapters' package"
    probe = (
        "import sys\n"
        "import snn_localrules.kernels.sltt_cuda as k, snn_localrules.presets as p\n"
        "assert callable(p.vgg9) and k.SURROGATE_IDS\n"
        + _PLUGINS_PROBE +
        "print('modules', *sorted({m.__file__ for m in list(sys.modules.values())\n"
        "                         if m.__name__.startswith('snn_localrules') and getattr(m, '__file__', None)}))\n"
    )
    (modules,) = _assert_plugins(_run_isolated(tmp_path, unpacked, probe), unpacked / "snn_localrules" / "adapters")
    # every module of this package that ran came from the wheel
    files = modules.split()[1:]
    assert files and all(file.startswith(str(unpacked)) for file in files), files


def test_a_source_checkout_runs_without_being_installed(tmp_path):
    # PYTHONPATH=<checkout>, nothing installed: how benchmarks/gpu_session.sh runs on a lent GPU machine.
    # The adapters/ folder (snn_localrules.adapters once installed) must still load as the plugins.
    source = _copy_of_the_tree(tmp_path)
    probe = (
        "import importlib.metadata as md\n"
        "assert not [d for d in md.distributions() if d.metadata['Name'] == 'snn-localrules']\n"
        + _PLUGINS_PROBE +
        "print(slr.__file__)\n"
    )
    (package,) = _assert_plugins(_run_isolated(tmp_path, source, probe), source / "adapters")
    assert package == str(source / "snn_localrules" / "__init__.py")
