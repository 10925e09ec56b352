#!/usr/bin/env python3
"""Prints scripts/krew/mailoauth.yaml for a release: OWNER/mail-oauth-operator replaced by the
GitHub repository the release is published in, and each platform's sha256 that of its archive
(the release workflow's `plugin` job runs it).

    scripts/krew/render.py OWNER/NAME VERSION DIR > mailoauth.yaml

DIR holds kubectl-mailoauth-<os>-<arch>.tar.gz for every platform the manifest names; VERSION
(without a `v`) must be the manifest's. Only the standard library: the runner needs nothing."""
import hashlib
import re
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().with_name("mailoauth.yaml")


def render(text, repository, version, archives):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}", repository):
        raise SystemExit(f"not a GitHub repository (owner/name): {repository!r}")
    if f"\n  version: v{version}\n" not in text:
        raise SystemExit(f"the manifest's version is not v{version}: bump scripts/krew/mailoauth.yaml")
    out, os_, arch, seen = [], None, None, set()
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("os: "):
            os_ = stripped[4:]
        elif stripped.startswith("arch: "):
            arch = stripped[6:]
        elif stripped.startswith("sha256: "):
            name = f"kubectl-mailoauth-{os_}-{arch}.tar.gz"
            path = archives / name
            if not path.is_file():
                raise SystemExit(f"missing {path}")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            line = line[: line.index("sha256: ")] + f'sha256: "{digest}"\n'
            seen.add(name)
        out.append(line.replace("github.com/OWNER/mail-oauth-operator", f"github.com/{repository}"))
    if not seen:
        raise SystemExit("the manifest names no platform")
    return "".join(out)


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(render(MANIFEST.read_text(), argv[1], argv[2], Path(argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
