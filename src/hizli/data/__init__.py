"""Data: loading (ShareGPT / messages / Alpaca), chat templates, tokenisation with labels, collators,
checks. ``sample_path("sharegpt")`` locates the conversations packaged with hizli, ``sample_dataset()``
loads them as a ``datasets.Dataset``."""

from hizli.data.sample import sample_dataset, sample_path

__all__ = ["sample_dataset", "sample_path"]
