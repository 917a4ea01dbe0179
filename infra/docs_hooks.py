"""A mkdocs hook of the docs site (``mkdocs.yml`` ``hooks:``), not used at run time.

The docstrings cross-reference in Sphinx's style (:func:`events.serde.AvroDecoder`), which
mkdocstrings renders as the role's name followed by the code span. This drops the role, and the
``~`` that shortens a name, so the API pages show the name as code.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const|ref):<code>~?")


def on_page_content(html: str, **_: Any) -> str:
    """mkdocs' ``on_page_content`` event: the page's HTML with the roles dropped."""
    return ROLE.sub("<code>", html)
