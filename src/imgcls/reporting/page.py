"""The pieces every HTML page of imgcls is made of: one style, images embedded as PNG, plain tables."""

from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.note { color: #666; font-size: 0.9em; }
"""

# Marks the page once every image has decoded; a broken image is named on the page.
CHECK_IMAGES = """
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(img => !(img.complete && img.naturalWidth > 0));
  document.body.dataset.imagesDecoded = `${images.length - broken.length}/${images.length}`;
  for (const img of broken) img.insertAdjacentText("afterend", `[image ${img.alt} failed to load]`);
});
"""


def img_file(path: Path, alt: str) -> str:
    return png_img(Path(path).read_bytes(), alt)


def png_img(png: bytes, alt: str, title: str = "") -> str:
    """An <img> holding PNG bytes inline, with an optional tooltip."""
    data = base64.b64encode(png).decode()
    tip = f' title="{html.escape(title)}"' if title else ""
    return f'<img alt="{html.escape(alt)}"{tip} src="data:image/png;base64,{data}">'


def html_table(header: list[str] | None, rows: list[list]) -> str:
    """A table; `header` None for a list of name-value rows, which has no header row."""
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{CHECK_IMAGES}</script></head><body>{body}</body></html>")


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"
