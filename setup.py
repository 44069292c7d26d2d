"""Builds the optional C++ CPU kernel (fastbirnn._C) as a torch extension.

Install without build isolation so the extension compiles against the installed torch:
    pip install --no-build-isolation -e .
If the compiler fails, the package still installs: the 'cpp' backend then reports why it is
unavailable and 'auto' falls back to the next backend.

Two things make the install friendlier than a plain BuildExtension:

- Progress: pip hides a build's output unless run with -v, so the ~40 s compile would show
  only a spinner. While compiling, a line with the elapsed time is written every few seconds
  to the terminal (/dev/tty), or to stderr where there is none (CI logs, ``pip install -v``).
- Reuse: the built library is kept in build/ext-cache/<key>/, where the key hashes everything
  that decides its content (csrc/, compiler flags, compiler, torch and Python versions). A
  second install from the same clone (the README's test command after its benchmark command)
  copies it instead of compiling again. A fresh clone has no cache and compiles. Set
  FASTBIRNN_BUILD_CACHE=0 to always compile.
"""

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, "build", "ext-cache")
PROGRESS_EVERY_S = 5.0

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def _open_terminal():
    """The terminal, which pip does not capture (it hides a build's stdout/stderr), or None."""
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


def _say(text):
    out = _open_terminal()
    print(text, file=out or sys.stderr, flush=True)
    if out is not None:
        out.close()


@contextlib.contextmanager
def _progress(message):
    """Say ``message`` now, then the elapsed seconds every few seconds until the block ends."""
    out = _open_terminal()
    stream = out or sys.stderr
    start = time.monotonic()
    finished = threading.Event()

    def say(text):
        # '\r': start at column 0, over pip's spinner character.
        print(f"\r{text}", file=stream, flush=True)

    def tick():
        while not finished.wait(PROGRESS_EVERY_S):
            say(f"  {message}: {time.monotonic() - start:.0f} s")

    say(f"  {message} ...")
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        finished.set()
        ticker.join()
        say(f"  {message}: done in {time.monotonic() - start:.0f} s")
        if out is not None:
            out.close()


def _compiler_version():
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        return subprocess.run(compiler.split() + ["--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler


def _cache_key(ext):
    """A hash of everything the built library depends on, so a stale one is never reused."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, HERE).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    digest.update(repr((
        ext.name, ext.sources, ext.include_dirs, ext.define_macros, ext.libraries,
        ext.library_dirs, ext.extra_compile_args, ext.extra_link_args,
        torch.__version__, torch.version.git_version, torch._C._GLIBCXX_USE_CXX11_ABI,
        sys.version, sysconfig.get_config_var("EXT_SUFFIX"), _compiler_version(),
        [os.environ.get(v) for v in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")],
    )).encode())
    return digest.hexdigest()[:16]


# pip >= 25 shows a build's warnings to the user. These two say nothing about this project:
# torch warns that NumPy is missing (it is optional; command 1 installs none), and setuptools
# explains how editable installs work after every one.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
warnings.filterwarnings("ignore", message="Editable installation")

if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            target = self.get_ext_fullpath(ext.name)
            use_cache = os.environ.get("FASTBIRNN_BUILD_CACHE", "1") != "0"
            cached = None
            if use_cache:
                cached = os.path.join(CACHE_DIR, _cache_key(ext), os.path.basename(target))
                # Not gated on self.force: setuptools sets it for every editable install.
                if os.path.isfile(cached):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(cached, target)
                    _say(f"\r  fastbirnn: reusing the C++ CPU kernel built before ({cached})")
                    return
            try:
                with _progress("fastbirnn: compiling the C++ CPU kernel (csrc/)"):
                    super().build_extension(ext)
            except Exception as error:  # a failed build must not fail the install
                print(f"WARNING: fastbirnn C++ extension not built: {error}", file=sys.stderr)
                return
            if cached:
                self._store(target, cached)

        @staticmethod
        def _store(built, cached):
            # Keep only this key: an old entry is for sources or a torch no longer here.
            shutil.rmtree(CACHE_DIR, ignore_errors=True)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            partial = cached + ".partial"
            shutil.copy2(built, partial)
            os.replace(partial, cached)  # a reader never sees half a file

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -g0: debug info for torch's headers costs ~30% of the compile time and a user never
    # needs it; kept where CFLAGS/CXXFLAGS ask for it or for a sanitizer (.ci/sanitize),
    # whose reports need line numbers.
    user_flags = f"{os.environ.get('CFLAGS', '')} {os.environ.get('CXXFLAGS', '')}".split()
    wants_debug_info = any(f.startswith(("-g", "-fsanitize")) for f in user_flags)
    # -ffp-contract=off: a multiply and an add written apart stay two roundings (GCC would fuse
    # vector ones into an FMA), so a cell's vector path computes what its scalar loops compute.
    ext_modules.append(
        CppExtension(
            "fastbirnn._C",
            sources,
            extra_compile_args=["-O3", "-ffp-contract=off", *([] if wants_debug_info else ["-g0"]), *openmp],
            extra_link_args=openmp,
        )
    )
    cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
