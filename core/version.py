"""Atrium's version: the one place it is written (``pyproject.toml`` reads it from here).

``X.Y.Z`` for a release, ``X.Y.Z.devN`` while ``X.Y.Z`` is being made. CHANGELOG.md has a section
for every release and ``schema.release.graphql`` is the SDL of the latest one; the rules that tie
them together (and to breaking schema changes) are checked by ``atrium schema check``
(``atrium.ops.contract``). ``atrium --version`` prints it and ``/healthz`` answers it.
"""

VERSION = "0.2.0.dev0"
