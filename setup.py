"""The one compiled part: safeckpt.ops._diffstats, the fused loop behind `safeckpt diff`.

Optional: where it cannot be compiled, the install goes on and diff uses numpy instead
(same results, at about half the speed). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("safeckpt.ops._diffstats", ["src/safeckpt/ops/_diffstats.c"],
                             extra_compile_args=["-O3"], optional=True)])
