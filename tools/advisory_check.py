"""Re-check docs/dependency-audit.json (the offline advisory audit) against the lock files.

    python tools/advisory_check.py            # verdict per package, exit 1 on an unresolved hit
    python tools/advisory_check.py --markdown # the same as the table in docs/reliability.md

The JSON holds, for every locked package, the advisory records that were read by hand from copies of
the PyPA advisory database (id, aliases, dates, withdrawn, the ECOSYSTEM ranges and whether the locked
version appears in the record's `versions` list). This script applies the OSV rules with
packaging.version semantics: a record matches when the version is listed in `versions`, or when
introduced <= version and (no `fixed`, or version < fixed) and (no `last_affected`, or version <=
last_affected) for one of its ranges. A withdrawn record never matches. A matching record must carry a
`resolution` (superseded by another record, fix verified in the installed code, or accepted with a
reason); one without is reported as AFFECTED and the exit status is 1.

This is not a replacement for `make audit` (pip-audit against the live database): the JSON is a snapshot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
AUDIT = ROOT / "docs" / "dependency-audit.json"
LOCKS = {"runtime": ROOT / "requirements.lock", "dev": ROOT / "requirements-dev.lock"}


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def _v(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:  # pragma: no cover - records are normalised when written
        raise SystemExit(f"unparseable version {text!r} in {AUDIT}") from None


def record_matches(record: dict, version: Version) -> bool:
    if record.get("withdrawn"):
        return False
    if record.get("locked_in_versions"):
        return True
    for rng in record.get("ranges", []):
        if version < _v(rng.get("introduced", "0")):
            continue
        if "fixed" in rng and version >= _v(rng["fixed"]):
            continue
        if "last_affected" in rng and version > _v(rng["last_affected"]):
            continue
        return True
    return False


def evaluate(audit: dict) -> list[dict]:
    """One row per package: counts and the records that match the locked version."""
    locked = {scope: read_lock(path) for scope, path in LOCKS.items()}
    rows = []
    for pkg in audit["packages"]:
        version = locked["dev"].get(pkg["name"])
        if version is None:
            raise SystemExit(f"{pkg['name']} is in {AUDIT.name} but not in requirements-dev.lock: re-run the audit")
        if version != pkg["version"]:
            raise SystemExit(
                f"{pkg['name']}: lock has {version}, the audit checked {pkg['version']}: re-check that package"
            )
        hits, resolved = [], []
        for record in pkg["advisories"]:
            if record_matches(record, _v(version)):
                (resolved if record.get("resolution") else hits).append(record)
        rows.append(
            {
                "name": pkg["name"],
                "version": version,
                "scope": "runtime" if pkg["name"] in locked["runtime"] else "dev",
                "read": len(pkg["advisories"]),
                "mirror_listed": pkg.get("mirror_listed", 0),
                "unread": len(pkg.get("mirror_unread", [])),
                "mirror_checked": pkg.get("mirror_checked", True),
                "hits": hits,
                "resolved": resolved,
            }
        )
    missing = set(locked["dev"]) - {p["name"] for p in audit["packages"]}
    if missing:
        raise SystemExit(f"not audited: {', '.join(sorted(missing))}")
    return rows


def _ids(records: list[dict], status: str) -> str:
    return ", ".join(r["id"] for r in records if r["resolution"]["status"] == status)


def markdown(rows: list[dict]) -> str:
    """Rows for packages with at least one advisory file; the rest are named in one line."""
    out = [
        "| package | locked | scope | records read | newer copy: listed / not read | locked version affected? |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    clean, clean_dev = [], []
    for row in rows:
        if not row["read"] and not row["mirror_listed"]:
            (clean if row["mirror_checked"] else clean_dev).append(row["name"])
            continue
        accepted = _ids(row["resolved"], "accepted-no-fix")
        other = [r for r in row["resolved"] if r["resolution"]["status"] != "accepted-no-fix"]
        if row["hits"]:
            verdict = "**AFFECTED**: " + ", ".join(r["id"] for r in row["hits"])
        elif accepted:
            verdict = f"**yes, no fixed release exists**: {accepted} (accepted, see below)"
        elif other:
            verdict = (
                "no (range-only match: " + "; ".join(f"{r['id']} {r['resolution']['status']}" for r in other) + ")"
            )
        else:
            verdict = "no"
        listed = f"{row['mirror_listed']} / {row['unread']}" if row["mirror_listed"] else "0"
        if not row["mirror_checked"]:
            listed = "not checked"
        out.append(f"| {row['name']} | {row['version']} | {row['scope']} | {row['read']} | {listed} | {verdict} |")
    out.append("")
    out.append(f"No advisory file in either copy ({len(clean)} packages): " + ", ".join(clean) + ".")
    if clean_dev:
        out.append("")
        out.append(
            f"Dev-only, no advisory file in pypa/advisory-database, newer copy not checked ({len(clean_dev)}): "
            + ", ".join(clean_dev)
            + "."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/reliability.md")
    args = parser.parse_args(argv)
    rows = evaluate(json.loads(AUDIT.read_text()))
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            state = "AFFECTED" if row["hits"] else ("resolved" if row["resolved"] else "ok")
            print(f"{row['name']:20} {row['version']:18} {row['read']:4} records  {state}")
    hits = [(row["name"], r["id"]) for row in rows for r in row["hits"]]
    total = sum(row["read"] for row in rows)
    print(f"{len(rows)} packages, {total} advisory records evaluated, {len(hits)} unresolved", file=sys.stderr)
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main())
