"""Models: the catalog of aliases, the offline cache, pulling, and format importers (llama2.c)."""

from forgetless.models.catalog import CATALOG, CatalogEntry, ResolvedModel, cache_dir
from forgetless.models.llama2c import import_llama2c
from forgetless.models.pull import pull, resolve_model

__all__ = ["CATALOG", "CatalogEntry", "ResolvedModel", "cache_dir", "import_llama2c", "pull", "resolve_model"]
