"""axe-core (Deque's accessibility engine, from npm into .venv/node by `make test`) run
in a Playwright page: the critical and serious violations, each with where it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

AXE = Path(__file__).resolve().parent.parent / ".venv" / "node" / "node_modules" / "axe-core" / "axe.min.js"


def serious_violations(page: Any) -> list[str]:
    """What axe finds critical or serious on the page as it is now (an open dialog is
    part of it). The page's CSP keeps inline scripts out, so its context needs
    ``bypass_csp=True`` for axe to be added."""
    if not AXE.exists():
        pytest.fail(f"axe-core is not in {AXE}: `make test` installs it (npm)")
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=AXE.read_text())
    found = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
        .filter(v => v.impact === 'critical' || v.impact === 'serious')
        .map(v => `${v.id} (${v.impact}): ` + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))""")
    return list(found)
