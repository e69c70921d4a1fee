"""The web page under a route prefix: the server sets its `<base href>` to the prefix, and no URL in the
page's files starts with "/", so every one of them resolves under it (the browser test in
tests/integration/test_web_page.py runs the page there)."""

import re

from serve_app.http_app import PAGE_BASE, WEB_DIR, page_html

# A quoted string or a CSS url() that starts with "/" and a name: a path from the host's root.
ROOTED = re.compile(r"""(["'`]|url\()/(?=\w)""")


def test_the_page_base_is_the_route_prefix():
    assert PAGE_BASE in (WEB_DIR / "index.html").read_text()
    assert '<base href="/">' in page_html("")
    assert '<base href="/zimage/">' in page_html("/zimage") and PAGE_BASE not in page_html("/zimage")
    assert '<base href="/a&quot;b/">' in page_html('/a"b')


def test_no_url_in_the_page_starts_from_the_host_root():
    rooted = [f"{path.name}:{number}: {line.strip()}"
              for path in sorted(WEB_DIR.iterdir()) if path.suffix in (".html", ".js", ".css")
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if ROOTED.search(line)]
    assert rooted == []
