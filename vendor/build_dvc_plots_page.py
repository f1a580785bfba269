"""Build vendor/dvc_plots_page.html: the page `dvc plots show` fills, with vega inlined, so the plots
render offline.

DVC's own page loads vega, vega-lite and vega-embed from a CDN through its `{scripts}` placeholder;
this page has no such placeholder (DVC then adds no script tags) and carries the same versions of
the three libraries instead, with their licences. .dvc/config points `plots.html_template` here.

    python vendor/build_dvc_plots_page.py      # npm pack, check each file's SHA-256, write the page
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PAGE = Path(__file__).with_name("dvc_plots_page.html")
# The versions dvc-render's page names, each build file pinned by its SHA-256.
LIBRARIES = {
    "vega@5.20.2": ("build/vega.min.js", "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be"),
    "vega-lite@5.2.0": ("build/vega-lite.min.js", "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb"),
    "vega-embed@6.18.2": ("build/vega-embed.min.js",
                          "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e"),
}
# DVC calls vegaEmbed(el, spec) with the default menu, whose "Open in Vega Editor" goes online: left out.
OFFLINE_MENU = """<script>
(function (embed) {
    window.vegaEmbed = function (el, spec, opt) {
        return embed(el, spec, Object.assign({actions: {export: true, source: true, compiled: false, editor: false}},
                                             opt || {}));
    };
})(window.vegaEmbed);
</script>"""
TEMPLATE = """<!DOCTYPE html>
<!-- Built by vendor/build_dvc_plots_page.py; do not edit. -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{licences}
{scripts}
{menu}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(spec: str, member: str, sha256: str, work: Path) -> tuple[str, str]:
    """(the build file's text, the package's LICENSE text) from `npm pack <spec>`, checked against sha256."""
    name = subprocess.run(["npm", "pack", spec, "--silent"], cwd=work, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(work / name) as tar:
        code = tar.extractfile(f"package/{member}").read()
        licence = tar.extractfile("package/LICENSE").read().decode()
    if hashlib.sha256(code).hexdigest() != sha256:
        sys.exit(f"{spec} {member}: SHA-256 {hashlib.sha256(code).hexdigest()}, expected {sha256}")
    # The source map comment would make a browser's developer tools fetch a file that is not here.
    text = "\n".join(line for line in code.decode().splitlines() if not line.startswith("//# sourceMappingURL="))
    if "</script" in text or any(f"{{{p}}}" in text for p in ("scripts", "plot_divs", "refresh_tag")):
        sys.exit(f"{spec}: its code holds a sequence that would break the page (</script or a DVC placeholder)")
    return text, licence


def build() -> str:
    scripts, licences = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, (member, sha256) in LIBRARIES.items():
            code, licence = fetch(spec, member, sha256, Path(tmp))
            scripts.append(f"<script>/* {spec} {member} */\n{code}\n</script>")
            licences.append(f"<!-- {spec} (BSD-3-Clause):\n{licence.replace('--', '- -').strip()}\n-->")
    return TEMPLATE.format(licences="\n".join(licences), scripts="\n".join(scripts), menu=OFFLINE_MENU)


if __name__ == "__main__":
    PAGE.write_text(build())
    print(f"wrote {PAGE} ({PAGE.stat().st_size:,} bytes)")
