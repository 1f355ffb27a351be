#!/usr/bin/env python3
"""Render an incident report (``snapshotter quarantine report``) to a PNG with
headless Chromium, to look at the page the way a reviewer's browser shows it.

    python scripts/render_report.py report.html -o report.png [--width 1280 --height 2000]

The browser runs with networking in the background disabled and a throwaway
profile; a report that needed the network would render broken here.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser(explicit: str | None) -> str:
    for name in ([explicit] if explicit else BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"no Chromium found (tried {', '.join(BROWSERS)}); install one (apt-get install chromium) "
             f"or pass --browser")


def render(html: pathlib.Path, png: pathlib.Path, *, width: int, height: int, browser: str) -> None:
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        sys.exit(f"{browser} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=pathlib.Path, help="the report file")
    ap.add_argument("-o", "--output", type=pathlib.Path, help="PNG to write (default: next to the report)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--browser", help="Chromium executable (default: the first found on PATH)")
    args = ap.parse_args()
    if not args.html.is_file():
        sys.exit(f"{args.html}: no such file")
    png = args.output or args.html.with_suffix(".png")
    png.unlink(missing_ok=True)
    render(args.html, png, width=args.width, height=args.height, browser=find_browser(args.browser))
    print(png)


if __name__ == "__main__":
    main()
