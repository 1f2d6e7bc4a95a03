"""Build hook: install ``sglang_spectrum_autoload.pth`` into site-packages.

All metadata lives in pyproject.toml. This file only adds the ``.pth`` that
activates the SGLang plugin (``sglang_spectrum/sglang_plugin/autoload.py``) at
the root of both kinds of wheels, so pip installs and uninstalls it like any
other file:

* regular wheels (``pip install .``, ``pip wheel .``): ``build_py`` copies it
  to the root of ``build_lib``;
* editable wheels (``pip install -e .``, PEP 660): setuptools' editable wheel
  only carries its own path hooks, so ``editable_wheel`` writes ours into the
  unpacked wheel directory before it is zipped.
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "sglang_spectrum_autoload.pth"
PTH_SRC = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "sglang_spectrum", "sglang_plugin", PTH_NAME
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.mkpath(self.build_lib)
            self.copy_file(PTH_SRC, os.path.join(self.build_lib, PTH_NAME), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(
        self, installation_dir, pth_prefix
    ):  # called with the unpacked wheel dir
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(PTH_SRC, os.path.join(installation_dir, PTH_NAME))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
