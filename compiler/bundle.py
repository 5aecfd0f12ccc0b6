"""`kiln bundle`: an artifact plus the runtime alone, as a folder and a .tar.gz that run on this host.

A bundle holds the artifact, `kiln.runtime`, TVM's runtime (its Python package without
`libtvm_compiler.so`, headers, sources, vendored code or `tvm.relax`), `tvm_ffi`, and what the runtime
imports while it loads and serves (numpy, tokenizers, jinja2, blake3: kiln's own requirements without an extra,
see pyproject.toml; with `serve`: fastapi, uvicorn, prometheus_client, pydantic and what they require).
Packages are copied file by file from the installed environment, following each distribution's own file
list (RECORD) and its requirements, so the bundle is for this Python version and platform; the launchers
refuse any other. What the runtime never opens stays out: build-time files (type stubs, C headers and
sources, static libraries), test suites, TVM's device backends and CUDA runtime (kept for a cuda artifact:
CUDA_KEEPS), and the shared libraries' symbol tables (`strip --strip-unneeded`, where the host has it; what
dynamic linking needs is kept).

The launchers `./run` and `./serve` start `python3 -I -S` (no user site, no site-packages, no PYTHON*
variables): the interpreter sees its standard library and the bundle's `lib/` only, never a torch or a
TVM installed on the host. `bundle.json` records the versions and the SHA-256 of every file outside the
artifact, which carries its own `manifest.sha256`.
"""

from __future__ import annotations

import compileall
import fnmatch
import json
import os
import platform
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.artifact import read_manifest
from kiln.runtime.integrity import MANIFEST_SUM, sha256_file, verify_files

from .errors import KilnError

# what the runtime imports to load an artifact and generate (kiln's requirements without an extra, which
# tests/test_bundle.py checks against pyproject.toml); requirements of these come along
RUNTIME_DISTS = ("apache-tvm", "numpy", "tokenizers", "jinja2", "blake3")
# what `serve` adds: kiln[serve] (kiln[structured], xgrammar, is left out: below)
SERVE_DISTS = ("fastapi", "uvicorn", "prometheus-client", "pydantic")
# declared requirements that a bundle leaves out, and why
LEFT_OUT = {
    "huggingface-hub": "tokenizers needs it only to download tokenizers; the artifact carries its own",
    "xgrammar": "kiln[structured]: it imports torch and transformers (and requires triton); JSON output "
    "(response_format) answers an error that says so",
    "torch": "the runtime never imports it",
}
# parts of a package that the runtime never opens (paths inside site-packages; a trailing / is a folder,
# a * a wildcard)
PRUNE = {
    "apache-tvm": (
        "tvm/lib/libtvm_compiler.so",  # the compiler (about 250 MB); TVM falls back to its runtime alone
        "tvm/3rdparty/",
        "tvm/include/",
        "tvm/src/",
        "tvm/cmake/",
        "tvm/lib64/",
        "tvm/relax/",  # imported only with the compiler library
        "tvm/s_tir/",  # schedules, kernels and tools for building, never imported by `import tvm`
        "tvm/topi/",
        "tvm/testing/",
        "tvm/exec/",
        "tvm/web/",
        # device backends' Python hooks: TVM loads them only with its compiler library
        *(f"tvm/backend/{b}/" for b in ("cuda", "metal", "rocm", "trn", "opencl", "vulkan", "webgpu", "hexagon")),
        "tvm/backend/adreno/",
        "tvm/lib/libtvm_runtime_cuda.so",  # TVM's CUDA runtime: kept in a bundle of a cuda artifact (CUDA_KEEPS)
        "tvm/lib/libtvm_runtime_extra.so",  # disco (multi-GPU sessions); tvm.runtime imports without it
    ),
    "apache-tvm-ffi": (
        "tvm_ffi/3rdparty/",
        "tvm_ffi/include/",
        "tvm_ffi/src/",
        "tvm_ffi/cmake/",
        "tvm_ffi/share/",
        "tvm_ffi/cython/",
        "tvm_ffi/stub/",
    ),
    "numpy": (
        "numpy/f2py/",
        "numpy/distutils/",
        "numpy/_pyinstaller/",
        "numpy/_core/include/",
        "numpy/_core/_simd.*",  # numpy's SIMD test harness
        "numpy/_core/_*_tests.*",  # extension modules for numpy's own tests
    ),
}
# what a bundle of a cuda artifact keeps of PRUNE: TVM's CUDA runtime (runtime/cuda.py loads it); the GPU
# driver, libcudart and libcublas are the host's (the CUDA toolkit), and nvcc too unless the artifact carries
# its compiled kernels (kiln kernels)
CUDA_KEEPS = ("tvm/lib/libtvm_runtime_cuda.so",)
# files for building against a package or checking types, never opened by a running program
BUILD_ONLY_SUFFIXES = (".pyi", ".pxd", ".pyx", ".h", ".hpp", ".c", ".cc", ".cpp", ".a")
LAUNCHERS = ("run", "serve")
BOOT = "boot.py"


@dataclass
class BundleInfo:
    """What `make_bundle` wrote: the folder, the archive, sizes in bytes and the packages inside."""

    path: str
    archive: str | None
    bytes_runtime: int
    bytes_artifact: int
    bytes_archive: int
    packages: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"
        lines = [
            f"bundle: {self.path}",
            f"runtime (python packages, launchers): {mb(self.bytes_runtime)}; artifact: {mb(self.bytes_artifact)}",
        ]
        if self.archive:
            lines.append(f"archive: {self.archive} ({mb(self.bytes_archive)})")
        lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in sorted(self.packages.items())))
        lines.append(f"run it: {self.path}/run --prompt 'Hello'")
        return "\n".join(lines)


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(serve: bool) -> dict[str, Any]:
    """The installed distributions a bundle needs, by canonical name: the roots and their requirements
    (no extras), less LEFT_OUT."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo = list(RUNTIME_DISTS + (SERVE_DISTS if serve else ()))
    found: dict[str, Any] = {}
    while todo:
        name = _canon(todo.pop())
        if name in found or name in LEFT_OUT:
            continue
        try:
            found[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            extra = " (pip install 'kiln[serve]')" if serve else ""
            raise KilnError(f"kiln bundle copies {name} from this environment, and it is not installed{extra}") from e
        for r in found[name].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _pruned(dist: str, rel: str, keep: tuple[str, ...] = ()) -> bool:
    if rel in keep:
        return False
    parts = rel.split("/")
    if "__pycache__" in parts or "tests" in parts[:-1]:  # stale bytecode, packages' own test suites
        return True
    if rel.endswith(BUILD_ONLY_SUFFIXES):
        return True
    return any(
        rel == p or (p.endswith("/") and rel.startswith(p)) or ("*" in p and fnmatch.fnmatchcase(rel, p))
        for p in PRUNE.get(dist, ())
    )


def _copy_dist(dist: Any, lib: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Copy the distribution's files into lib; returns the shared libraries that may be stripped: none
    from a wheel that grafted libraries into a `*.libs` folder (auditwheel), whose files patchelf
    rewrote and `strip` would break (numpy's OpenBLAS then fails to load)."""
    name = _canon(dist.metadata["Name"])
    grafted = any(f.parts[0].endswith(".libs") for f in dist.files or [])
    shared = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.startswith("../") or _pruned(name, rel, keep):  # scripts outside site-packages, parts never opened
            continue
        src = str(dist.locate_file(f))
        if not os.path.isfile(src):
            continue
        dst = os.path.join(lib, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
        if not grafted and (rel.endswith(".so") or ".so." in rel):
            shared.append(dst)
    return shared


def _strip_shared_libs(paths: list[str]) -> int:
    """`strip --strip-unneeded` these shared libraries (symbol tables and debug sections, read only by
    debuggers; the dynamic symbols that loading needs stay). Returns the bytes saved; without `strip` on
    the host, or where it fails, a library is kept as it was."""
    tool = shutil.which("strip")
    saved = 0
    for p in paths if tool else []:
        before = os.path.getsize(p)
        r = subprocess.run([tool, "--strip-unneeded", p], capture_output=True, timeout=120)  # type: ignore[list-item]
        saved += before - os.path.getsize(p) if r.returncode == 0 else 0
    return saved


def _copy_kiln(lib: str) -> None:
    """kiln's package file (lazy: importing it imports nothing) and kiln.runtime, sources only."""
    import kiln
    import kiln.runtime

    os.makedirs(os.path.join(lib, "kiln", "runtime"))
    shutil.copy2(kiln.__file__, os.path.join(lib, "kiln", "__init__.py"))
    src = os.path.dirname(kiln.runtime.__file__)
    for n in sorted(os.listdir(src)):
        if n.endswith(".py"):
            shutil.copy2(os.path.join(src, n), os.path.join(lib, "kiln", "runtime", n))


_LAUNCHER = """#!/bin/sh
# kiln bundle launcher: {what}. Runs the bundle's own packages only (python -I -S);
# KILN_PYTHON picks the interpreter (Python {py} on {plat}).
here=$(cd "$(dirname "$0")" && pwd)
exec "${{KILN_PYTHON:-python3}}" -I -S "$here/{boot}" {cmd} "$here/artifact" "$@"
"""

_BOOT = '''"""Start kiln's runtime from this bundle: check the interpreter, put lib/ first, run or serve."""

import json
import os
import sys
import sysconfig

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "bundle.json"), encoding="utf-8") as f:
    want = json.load(f)["python"]
have = {"version": f"{sys.version_info[0]}.{sys.version_info[1]}", "implementation": sys.implementation.name,
        "platform": sysconfig.get_platform()}
if have != want:
    sys.exit("kiln bundle: made for %(implementation)s %(version)s on %(platform)s; " % want
             + "this interpreter is %(implementation)s %(version)s on %(platform)s: " % have
             + "run it with that Python (KILN_PYTHON=/path/to/python ./run ...), or bundle again on this host")
os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # TVM's runtime library alone (the compiler is not in the bundle)
os.environ["TVM_DEVICE_BACKEND_AUTOLOAD"] = "0"  # no scan of installed packages for TVM plug-ins: there are none
sys.path.insert(0, os.path.join(here, "lib"))
from kiln.runtime.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:], prog=os.path.basename(sys.argv[2]) if len(sys.argv) > 2 else "kiln"))
'''


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


def _file_sums(root: str) -> dict[str, dict[str, Any]]:
    out = {}
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not (d == root and s == "artifact"))
        for n in sorted(names):
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if rel != "bundle.json":
                out[rel] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    return out


def make_bundle(artifact: str, out: str, serve: bool = False, tar: bool = True) -> BundleInfo:
    """Write a bundle of `artifact` to the folder `out` (which must not exist) and, with `tar`,
    `out`.tar.gz. The artifact is verified in full first: a bundle never carries a damaged artifact."""
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest)
    target = manifest.get("target", {}).get("name")
    if target not in ("cpu", "pim", "cuda"):
        raise KilnError(f"kiln bundle makes cpu and cuda bundles; {artifact} was built for target '{target}'")
    keep = CUDA_KEEPS if target == "cuda" else ()
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise KilnError(f"{out} exists: give a new folder to kiln bundle -o (or remove it)")
    dists = distributions(serve)
    os.makedirs(out)
    try:
        lib = os.path.join(out, "lib")
        shared = [p for d in dists.values() for p in _copy_dist(d, lib, keep)]
        _copy_kiln(lib)
        stripped = _strip_shared_libs(shared)
        # compiled once here: a fresh start imports without writing, and a read-only image starts as fast;
        # checked against the source's hash, not its time, so unpacking anywhere keeps them valid
        compileall.compile_dir(lib, quiet=1, workers=1, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        shutil.copytree(artifact, os.path.join(out, "artifact"), symlinks=False)
        py = {
            "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "implementation": sys.implementation.name,
            "platform": sysconfig.get_platform(),
        }
        with open(os.path.join(out, BOOT), "w", encoding="utf-8") as f:
            f.write(_BOOT)
        for cmd in LAUNCHERS:
            what = "generate from a prompt" if cmd == "run" else "serve the OpenAI-compatible HTTP API"
            p = os.path.join(out, cmd)
            with open(p, "w", encoding="utf-8") as f:
                f.write(_LAUNCHER.format(what=what, py=py["version"], plat=py["platform"], boot=BOOT, cmd=cmd))
            os.chmod(p, 0o755)
        import kiln

        packages = {d.metadata["Name"]: d.version for d in dists.values()}
        info = {
            "format": 1,
            "kiln": kiln.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": py,
            "machine": platform.machine(),
            "serve": serve,
            "packages": dict(sorted(packages.items())),
            "left_out": LEFT_OUT,
            "pruned": {k: [p for p in v if p not in keep] for k, v in PRUNE.items()},
            "pruned_suffixes": list(BUILD_ONLY_SUFFIXES),
            "stripped_bytes": stripped,
            "source": "copied from the installed environment (each distribution's RECORD)",
            "artifact": {
                "dir": "artifact",
                "target": manifest.get("target", {}),
                "manifest_sha256_sha256": sha256_file(os.path.join(out, "artifact", MANIFEST_SUM)),
            },
            "files": _file_sums(out),
        }
        with open(os.path.join(out, "bundle.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    archive = None
    if tar:
        archive = out + ".tar.gz"
        _write_tar(out, archive)
    bytes_artifact = _tree_bytes(os.path.join(out, "artifact"))
    return BundleInfo(
        path=out,
        archive=archive,
        bytes_runtime=_tree_bytes(out) - bytes_artifact,
        bytes_artifact=bytes_artifact,
        bytes_archive=os.path.getsize(archive) if archive else 0,
        packages=packages,
    )


def _write_tar(folder: str, archive: str) -> None:
    """The folder as one top-level directory, members sorted, owners cleared (unpacks the same anywhere)."""

    def clean(t: tarfile.TarInfo) -> tarfile.TarInfo:
        t.uid = t.gid = 0
        t.uname = t.gname = ""
        return t

    tmp = archive + ".partial"
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
        base = os.path.basename(folder)
        for d, subdirs, names in os.walk(folder):
            subdirs.sort()
            for n in sorted(names):
                p = os.path.join(d, n)
                tf.add(p, arcname=os.path.join(base, os.path.relpath(p, folder)), filter=clean)
    os.replace(tmp, archive)
