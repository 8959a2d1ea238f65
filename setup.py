"""Build the optional C accelerator of jobflow_cache.hashing (the rest is in pyproject.toml).

``optional=True``: if the extension does not compile (no compiler, no Python headers), setuptools
warns and installs the package without it; hashing then uses its pure-Python path, which gives the
same digests.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "jobflow_cache._speedups",
            sources=["src/jobflow_cache/_speedups.c"],
            optional=True,
        )
    ]
)
