"""Plugin discovery for the one-file-per-plugin packages (methods/, mitigations/)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from importlib.metadata import entry_points


def discover(package: str, path: Iterable[str], helpers: set[str], group: str) -> None:
    """Import every module of `package` (at `path`) except `helpers` and private ones, in name order, so each
    registers its plugin; then the modules named by the installed entry points of `group`."""
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda i: i.name):
        if info.name not in helpers and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    for ep in entry_points(group=group):
        ep.load()
