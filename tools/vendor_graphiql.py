"""Re-vendor GraphiQL's browser assets into ``atrium/graphiql/static/vendor`` from the npm registry.

    python tools/vendor_graphiql.py            # fetch the pinned versions, check, write the files
    python tools/vendor_graphiql.py --update   # after changing a version in vendor.json: accept its tarball

``vendor.json`` (next to the assets) is the one description: for each package its pinned version,
the npm ``integrity`` of its tarball, and which files of the tarball are copied (the UMD build and
the licence), each with its SHA-256. The script runs ``npm pack NAME@VERSION`` (the ordinary npm
client, which itself checks the registry's integrity), refuses a tarball whose integrity is not the
recorded one (unless ``--update``), copies the listed files byte for byte, removes anything else in
the package's folder and rewrites ``vendor.json`` with the files' hashes. Running it again changes
nothing: the output depends on the pinned tarballs only. ``tests/test_graphiql.py`` checks the
committed files against ``vendor.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

VENDOR = Path(__file__).resolve().parent.parent / "atrium" / "graphiql" / "static" / "vendor"
MANIFEST = VENDOR / "vendor.json"


def npm_pack(spec: str, into: Path) -> tuple[Path, str]:
    """Download ``spec``'s tarball with ``npm pack``; its path and npm's integrity string."""
    ran = subprocess.run(["npm", "pack", spec, "--json", "--pack-destination", str(into)],  # noqa: S603, S607
                         check=True, capture_output=True, text=True)
    packed = json.loads(ran.stdout)[0]
    return into / packed["filename"], str(packed["integrity"])


def integrity_of(tarball: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()


def vendor(package: dict[str, Any], work: Path, *, update: bool) -> None:
    name, version = package["name"], package["version"]
    tarball, reported = npm_pack(f"{name}@{version}", work)
    actual = integrity_of(tarball)
    if actual != reported:
        raise SystemExit(f"{name}@{version}: the tarball does not match the registry's integrity")
    if package.get("integrity") != actual:
        if not update:
            raise SystemExit(f"{name}@{version}: integrity {actual} is not the recorded {package.get('integrity')}"
                             " (run with --update after changing a version on purpose)")
        package["integrity"] = actual
    target = VENDOR / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    hashes: dict[str, str] = {}
    with tarfile.open(tarball) as archive:
        for source, destination in sorted(package["files"].items()):
            member = archive.extractfile(f"package/{source}")
            if member is None:
                raise SystemExit(f"{name}@{version} has no file {source}")
            data = member.read()
            (target / destination).write_bytes(data)
            hashes[destination] = hashlib.sha256(data).hexdigest()
    package["sha256"] = hashes


def main() -> int:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--update", action="store_true", help="accept new tarballs for changed versions")
    args = options.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    with tempfile.TemporaryDirectory(prefix="atrium-vendor-") as work:
        for package in manifest["packages"]:
            vendor(package, Path(work), update=args.update)
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for package in manifest["packages"]:
        sys.stdout.write(f"{package['name']}@{package['version']}: {', '.join(sorted(package['sha256']))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
