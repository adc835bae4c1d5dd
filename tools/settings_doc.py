"""Write the settings table of docs/configuration.md from service/settings.py (defaults and descriptions).

python tools/settings_doc.py           # rewrite the table
python tools/settings_doc.py --check   # exit 1 if the page is out of date (tests/test_docs.py runs this check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.settings import settings_markdown  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
START = "## Settings (environment variables)\n\n"
END = "\nAn invalid value"


def render(page: str) -> str:
    """``page`` with the table between START and END replaced by the current one."""
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + settings_markdown() + END + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the page is out of date")
    args = parser.parse_args()
    page = PAGE.read_text()
    new = render(page)
    if args.check:
        if new != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python tools/settings_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
