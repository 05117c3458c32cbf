"""One self-contained HTML page: inline style, every image embedded as a ``data:`` URI, no script or file from
elsewhere. A small inline script records, once the page has loaded, how many of its images decoded
(``<body data-images-loaded="N/M" data-images-broken="...">``), which the browser test reads."""

from __future__ import annotations

import base64
import html

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #1d1d1f;
       background: #f4f5f7; }
main { max-width: 1500px; margin: 0 auto; padding: 20px 28px 40px; }
header { background: #20232a; color: #fafafa; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #c5c8ce; font-size: 14px; }
header code { color: #fafafa; }
h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 1px solid #d7d9de; padding-bottom: 4px; }
section { background: white; border-radius: 8px; padding: 4px 18px 14px; margin-top: 14px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #555; margin-top: 4px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 6px; }
.card { background: white; border-radius: 8px; padding: 12px 16px; min-width: 200px; flex: 1;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); border-top: 4px solid #888; }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #666; }
.card .value { font-size: 22px; font-weight: 600; margin: 4px 0; }
.card .detail { font-size: 13px; color: #444; }
.stage-adapting { border-top-color: #1f77b4; } .stage-corruption { border-top-color: #d62728; }
.stage-memorising { border-top-color: #9467bd; } .stage-unknown { border-top-color: #888; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; font-size: 14px; margin: 8px 0; }
table { border-collapse: collapse; font-size: 14px; margin: 6px 0; }
th, td { border-bottom: 1px solid #e3e4e8; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f0f1f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.first td { background: #eef7ee; }
pre { background: #f6f8fa; border: 1px solid #e3e4e8; padding: 10px; font-size: 12px; overflow: auto;
      max-height: 420px; }
details summary { cursor: pointer; font-size: 14px; color: #333; }
footer { font-size: 12px; color: #666; margin-top: 26px; }
"""

#: Runs after load: counts the images that decoded (complete with a natural width), names the others.
IMAGE_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  var broken = images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.dataset.imagesLoaded = ok.length + '/' + images.length;
  document.body.dataset.imagesBroken = broken.map(function (im) { return im.alt || '?'; }).join('|');
});
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def note(text: str) -> str:
    return f'<div class="note">{esc(text)}</div>'


def card(label: str, value: str, detail: str = "", css: str = "") -> str:
    return (
        f'<div class="card {css}"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
        f'<div class="detail">{detail}</div></div>'
    )


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), first_class: str = "") -> str:
    """A table of escaped cells; columns in ``numeric`` align right; ``first_class`` marks the first row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{first_class}"' if first_class and k == 0 else ""
        cells = "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(row))  # fmt: skip
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, body: str, footer: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{STYLE}</style><script>{IMAGE_CHECK}</script></head>\n"
        f'<body><header><h1>{esc(title)}</h1><div class="sub">{subtitle}</div></header>\n'
        f"<main>{body}<footer>{footer}</footer></main></body></html>\n"
    )
