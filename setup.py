"""Builds the optional C++ CPU kernel (fastbirnn._C) as a torch extension.

Install without build isolation so the extension compiles against the installed torch:
    pip install --no-build-isolation -e .
If the compiler fails, the package still installs: the 'cpp' backend then reports why it is
unavailable and 'auto' falls back to the next backend.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # a failed build must not fail the install
                print(f"WARNING: fastbirnn C++ extension not built: {error}", file=sys.stderr)

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext_modules.append(
        CppExtension(
            "fastbirnn._C",
            sources,
            extra_compile_args=["-O3", *openmp],
            extra_link_args=openmp,
        )
    )
    cmdclass["build_ext"] = OptionalBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
