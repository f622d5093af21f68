"""Pretend the optional frameworks are not installed, to check that the tests skip cleanly without them.

    PYTHONPATH=scripts/without_frameworks .venv/bin/python -m pytest -q

Python imports `sitecustomize` at start-up, in every process (subprocesses the tests start included), so
each listed package fails to import as if absent. Only numpy, ml_dtypes, click, rich, blake3 (the core) and
the test tools stay.
"""
import importlib.abc
import sys

BLOCKED = {"torch", "jax", "jaxlib", "tensorflow", "keras", "paddle", "mlx", "lightning", "pytorch_lightning",
           "safetensors", "transformers", "moto", "s3fs", "fsspec", "matplotlib", "psutil", "omegaconf",
           "torchvision", "huggingface_hub", "tokenizers", "boto3", "botocore", "aiobotocore"}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
