"""Data: loading (ShareGPT / messages / Alpaca), chat templates, tokenisation with labels, collators,
checks. ``sample_path("sharegpt")`` locates the conversations packaged with hizli."""

from hizli.data.sample import sample_path

__all__ = ["sample_path"]
