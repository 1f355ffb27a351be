"""The incident report: one self-contained HTML page for reviewers.

The page holds everything inline (CSS, an SVG timeline; no script, no font,
no image, no link to fetch), so it can be mailed, attached to a ticket or
opened on an air-gapped machine.  Every value from the bundle is HTML-escaped:
quarantined records are what a compromised agent wrote.

It is built in one pass over the bundle; memory holds counters, one float per
timed write, and at most ``2 * max_records`` record diffs.
"""
from __future__ import annotations

import datetime as _dt
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from typing import Any

from . import __version__
from .documents import IncidentBundle, QuarantinedWrite
from .forensics import RecordFilter, atomic_output, diff_values, record_diff, select_records
from .names import iso, utcnow
from .quarantine import OPS, incident_status, replaced_settings
from .repository import Repository

MAX_RECORDS = 500
MAX_CHANGES_PER_RECORD = 60
TOP_SESSIONS = 20
TIMELINE_BUCKETS = 48
POST_COLOUR, PRE_COLOUR, UNCLASSIFIED_COLOUR = "#c62828", "#78909c", "#5b8def"


@dataclass
class _Tally:
    total: int = 0
    by_stream: dict = field(default_factory=dict)  # (source, stream) -> Counter
    times: array = field(default_factory=lambda: array("d"))
    classes: array = field(default_factory=lambda: array("b"))  # 1 post-failure, 0 before, -1 unclassified
    untimed: int = 0
    sessions: Counter = field(default_factory=Counter)
    session_post: Counter = field(default_factory=Counter)
    post_details: list = field(default_factory=list)
    other_details: list = field(default_factory=list)


def _tally(repo: Repository, bundle: IncidentBundle, max_records: int) -> _Tally:
    t = _Tally()
    for source, stream, rec in select_records(repo, bundle.doc, RecordFilter()):
        q = QuarantinedWrite.from_value(rec.value)
        t.total += 1
        c = t.by_stream.setdefault((source, stream), Counter())
        c[q.op] += 1
        post = q.post_failure
        if post is True:
            c["post_failure"] += 1
        written = q.written_at
        if isinstance(written, _dt.datetime):
            if written.tzinfo is None:
                written = written.replace(tzinfo=_dt.timezone.utc)
            t.times.append(written.timestamp())
            t.classes.append(1 if post is True else 0 if post is False else -1)
        else:
            t.untimed += 1
            c["untimed"] += 1
        session = q.session
        if session is not None:
            t.sessions[session] += 1
            if post is True:
                t.session_post[session] += 1
        # post-failure writes are what reviewers need first; the rest fills what is left
        target = t.post_details if post is True else t.other_details
        if len(target) < max_records:
            target.append(record_diff(bundle.doc, source, stream, rec))
    return t


# -- HTML pieces ----------------------------------------------------------------------

CSS = """
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#d9dee5; --bg:#ffffff; --panel:#f6f8fa;
  --add:#1a7f37; --add-bg:#e6f4ea; --mod:#9a6700; --mod-bg:#fff4d6; --del:#b42318; --del-bg:#fdecea;
  --post:#c62828; --pre:#78909c; --unk:#5b8def; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 16px; }
code, pre, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 12.5px; }
dl.summary { display: grid; grid-template-columns: max-content 1fr max-content 1fr; gap: 6px 18px; margin: 0;
  background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 14px 18px; }
dl.summary dt { color: var(--muted); }
dl.summary dd { margin: 0; word-break: break-all; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0 0; }
.card { flex: 1 1 140px; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
.card .n { font-size: 24px; font-weight: 600; }
.card .l { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card.added .n { color: var(--add); } .card.modified .n { color: var(--mod); }
.card.deleted .n { color: var(--del); } .card.post .n { color: var(--post); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--panel); font-weight: 600; font-size: 12.5px; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
  white-space: nowrap; }
.b-added { background: var(--add-bg); color: var(--add); }
.b-modified { background: var(--mod-bg); color: var(--mod); }
.b-deleted { background: var(--del-bg); color: var(--del); }
.b-post { background: var(--post); color: #fff; }
.b-pre { background: #eceff1; color: #455a64; }
.b-applied { background: var(--add-bg); color: var(--add); }
.b-interrupted, .b-rolled_back, .b-unverified { background: var(--del-bg); color: var(--del); }
.legend { display: flex; gap: 16px; color: var(--muted); font-size: 12.5px; margin-top: 4px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
  vertical-align: -1px; }
.note { color: var(--muted); font-size: 13px; }
.bar { height: 10px; background: var(--pre); border-radius: 2px; display: inline-block; vertical-align: middle; }
.bar.post { background: var(--post); }
.rec { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; overflow: hidden; }
.rec.is-post { border-left: 4px solid var(--post); }
.rec > header { background: var(--panel); padding: 7px 12px; display: flex; gap: 10px; flex-wrap: wrap;
  align-items: center; border-bottom: 1px solid var(--line); }
.rec > header .meta { color: var(--muted); font-size: 12.5px; }
.rec table { table-layout: fixed; }
.rec table td { font-size: 12.5px; }
.rec table th:first-child { width: 20%; }
.rec table td.path code { word-break: break-all; }
.val pre { margin: 0; white-space: pre-wrap; word-break: break-word; max-height: 260px; overflow: auto; }
del { background: var(--del-bg); color: var(--del); text-decoration: none; }
ins { background: var(--add-bg); color: var(--add); text-decoration: none; }
.absent { color: #a0a8b3; font-style: italic; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
@media print { .rec { break-inside: avoid; } .val pre { max-height: none; } }
"""


#: characters of one field on the page (a name, a key, a session; a value cell gets VALUE_CHARS):
#: a quarantined record is what a compromised agent wrote, a bundle anyone with write access
FIELD_CHARS = 300
VALUE_CHARS = 4000


def _clean(text: str) -> str:
    """Control and format characters (NUL, escapes, bidirectional overrides) and lone
    surrogates made visible as escapes; newlines and tabs stay."""
    if text.isprintable():
        return text
    import unicodedata
    out = []
    for ch in text:
        if ch.isprintable() or ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) == "Zs":
            out.append(" ")
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def _e(v: Any, limit: int = FIELD_CHARS) -> str:
    """A value from the bundle, as HTML text: cleaned, bounded, escaped."""
    text = "" if v is None else (v if isinstance(v, str) else str(v))
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters; see quarantine export)"
    return escape(_clean(text), quote=True)


def _json_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, indent=1)


def _key_text(key: Any) -> str:
    return json.dumps(key, ensure_ascii=False)


def _fmt_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _summary(bundle: IncidentBundle, status: dict, t: _Tally) -> str:
    st = status["status"]
    badge = f'<span class="badge b-{_e(st)}">{_e(st.replace("_", " "))}</span>'
    if st == "applied" and status.get("verified") is False:
        badge += ' <span class="badge b-unverified">verification failed</span>'
    if status.get("rolled_back"):
        rolled = _e(", ".join(status["rolled_back"]))
        badge += f' <span class="note">verification failed; sources rolled back: {rolled}</span>'
    if st == "interrupted":
        badge += ' <span class="note">the restore never recorded an outcome; live stores may hold a mix</span>'
    sel = bundle.selection or {}
    selected = "; ".join(f"{k}: {', '.join(v)}" for k, v in sel.items() if v) or "everything in the snapshot"
    rows = [
        ("Incident", f"<code>{_e(bundle.incident)}</code>"),
        ("Status", badge),
        ("Snapshot", f"<code>{_e(bundle.snapshot)}</code>"),
        ("Release", _e(bundle.release)),
        ("Quarantined at", _e(bundle.created_at)),
        ("Applied at", _e(status.get("applied_at") or "—")),
        ("Failure at", _e(bundle.failure_at or "not given (no post-failure classification)")),
        ("Responder", f"{_e(bundle.user)} on {_e(bundle.host)}"),
        ("Selection", _e(selected)),
        ("Tool", f"snapshotter {_e(bundle.tool_version)} ({_e(bundle.command)})"),
    ]
    if bundle.continues:
        rows.append(("Continues", _e(", ".join(bundle.continues))))
    settings = replaced_settings(bundle)
    if settings:
        # not records, so in no count below: a reviewer must still learn the restore replaced them
        rows.append(("Settings put back", "<br>".join(f"<code>{_e(line)}</code>" for line in settings)
                     + '<div class="note">the replaced values are in the incident\'s manifest.json, stream '
                       '<code>schema</code> (the snapshot\'s: <code>snapshot_schema</code>)</div>'))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    totals = Counter()
    for c in t.by_stream.values():
        totals.update(c)
    post = str(totals["post_failure"]) if bundle.failure_at else "—"
    cards = "".join(f'<div class="card {cls}"><div class="n">{_e(n)}</div><div class="l">{_e(label)}</div></div>'
                    for cls, n, label in [("", t.total, "records quarantined"), ("added", totals["added"], "added"),
                                          ("modified", totals["modified"], "modified"),
                                          ("deleted", totals["deleted"], "deleted"),
                                          ("post", post, "written after failure")])
    return f'<dl class="summary">{dl}</dl><div class="cards">{cards}</div>'


def _counts_table(bundle: IncidentBundle, t: _Tally) -> str:
    if not t.by_stream:
        return '<p class="note">The incident holds no records.</p>'
    has_failure = bool(bundle.failure_at)
    head = "".join(f'<th class="num">{op}</th>' for op in OPS)
    head += '<th class="num">post-failure</th>' if has_failure else ""
    head += '<th class="num">no write time</th><th class="num">total</th>'
    body = []
    for (source, stream), c in sorted(t.by_stream.items()):
        cells = "".join(f'<td class="num">{c[op]}</td>' for op in OPS)
        if has_failure:
            cells += f'<td class="num">{c["post_failure"]}</td>'
        cells += f'<td class="num">{c["untimed"]}</td><td class="num">{sum(c[op] for op in OPS)}</td>'
        body.append(f"<tr><td>{_e(source)}</td><td><code>{_e(stream)}</code></td>{cells}</tr>")
    return f"<table><tr><th>source</th><th>stream</th>{head}</tr>{''.join(body)}</table>"


def _timeline(bundle: IncidentBundle, t: _Tally) -> str:
    if not t.times:
        return ('<p class="note">No record has a known write time (the backend does not report one; for SQL '
                'sources set <code>timestamp_column</code>).</p>')
    lo, hi = min(t.times), max(t.times)
    nb = TIMELINE_BUCKETS if hi > lo else 1
    width = (hi - lo) / nb if hi > lo else 1.0
    post, pre, unk = [0] * nb, [0] * nb, [0] * nb
    for ts, cls in zip(t.times, t.classes):
        i = min(nb - 1, int((ts - lo) / width)) if hi > lo else 0
        (post if cls == 1 else pre if cls == 0 else unk)[i] += 1
    peak = max(p + q + u for p, q, u in zip(post, pre, unk)) or 1
    # the top margin holds the failure label, so it never sits on a bar
    W, H, left, right, top, bottom = 1100, 230, 46, 14, 26, 40
    pw, ph = W - left - right, H - top - bottom
    bw = pw / nb
    parts = [f'<svg viewBox="0 0 {W} {H}" width="100%" role="img" '
             f'aria-label="writes over time" style="font:11px sans-serif">',
             f'<line x1="{left}" y1="{top + ph}" x2="{W - right}" y2="{top + ph}" stroke="#9aa5b1"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#9aa5b1"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" fill="#5f6b7a">{peak}</text>',
             f'<text x="{left - 6}" y="{top + ph}" text-anchor="end" fill="#5f6b7a">0</text>']
    for i in range(nb):
        x = left + i * bw + 1
        y = top + ph
        start = lo + i * width
        tip = (f"{_fmt_time(start)} to {_fmt_time(start + width if hi > lo else hi)}: "
               f"{post[i] + pre[i] + unk[i]} write(s), {post[i]} post-failure")
        for n, colour in ((pre[i], PRE_COLOUR), (unk[i], UNCLASSIFIED_COLOUR), (post[i], POST_COLOUR)):
            if not n:
                continue
            h = n / peak * ph
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{_e(tip)}</title></rect>')
    failure = bundle.failure_at
    note = ""
    if failure:
        fts = _dt.datetime.fromisoformat(failure.replace("Z", "+00:00")).timestamp()
        if lo <= fts <= hi and hi > lo:
            fx = left + (fts - lo) / (hi - lo) * pw
            parts.append(f'<line x1="{fx:.1f}" y1="{top - 16}" x2="{fx:.1f}" y2="{top + ph}" stroke="#1d2330" '
                         f'stroke-width="1.5" stroke-dasharray="4 3"/>')
            anchor = "end" if fx > W * 0.8 else "start"
            dx = -5 if anchor == "end" else 5
            parts.append(f'<text x="{fx + dx:.1f}" y="{top - 8}" text-anchor="{anchor}" fill="#1d2330" '
                         f'font-weight="600">failure at {_e(failure)}</text>')
        else:
            where = "before the first" if fts < lo else "after the last"
            note = f'<p class="note">Failure at {_e(failure)} is {where} timed write.</p>'
    ticks = [(left, "start", lo), (left + pw / 2, "middle", (lo + hi) / 2), (W - right, "end", hi)]
    ticks = ticks if hi > lo else ticks[:1]
    for (x, anchor, _), text in zip(ticks, _tick_labels([ts for _, _, ts in ticks])):
        parts.append(f'<text x="{x:.1f}" y="{H - bottom + 16}" text-anchor="{anchor}" fill="#5f6b7a">'
                     f'{_e(text)}</text>')
    if hi > lo:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{H - 6}" text-anchor="middle" fill="#5f6b7a">'
                     f'each bar: {_e(_span(width))}</text>')
    parts.append("</svg>")
    keys = [(post, POST_COLOUR, "post-failure"), (pre, PRE_COLOUR, "before failure"),
            (unk, UNCLASSIFIED_COLOUR, "not classified (no --failure-at)")]
    legend = '<div class="legend">' + "".join(f'<span><i style="background:{colour}"></i>{label}</span>'
                                              for counts, colour, label in keys if any(counts)) + "</div>"
    untimed = (f'<p class="note">{t.untimed} record(s) have no write time (deleted records, or writes the '
               f'backend cannot date) and are not on the timeline.</p>') if t.untimed else ""
    return "".join(parts) + legend + note + untimed


def _tick_labels(times: list[float]) -> list[str]:
    """The timeline's tick labels, to the coarsest precision (seconds, then milliseconds,
    microseconds) at which they differ: writes a fraction of a second apart had three equal
    labels.  Closer still, the first is the time and the others its offset."""
    stamps = [_dt.datetime.fromtimestamp(ts, _dt.timezone.utc) for ts in times]
    for digits in (0, 3, 6):
        texts = [d.strftime("%Y-%m-%d %H:%M:%S") + (d.strftime(".%f")[:digits + 1] if digits else "") + "Z"
                 for d in stamps]
        if len(set(texts)) == len(texts):
            return texts
    return texts[:1] + [f"+{(ts - times[0]) * 1e6:.3g} µs" for ts in times[1:]]


def _span(seconds: float) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n:
            v = seconds / n
            return f"{v:.3g} {unit}{'s' if v != 1 else ''}"
    return f"{seconds:.3g} seconds"


def _sessions(bundle: IncidentBundle, t: _Tally) -> str:
    if not t.sessions:
        return '<p class="note">No quarantined record belongs to a conversation session.</p>'
    top = t.sessions.most_common(TOP_SESSIONS)
    peak = top[0][1]
    rows = []
    for session, n in top:
        p = t.session_post[session]
        bars = (f'<span class="bar post" style="width:{p / peak * 220:.0f}px"></span>'
                f'<span class="bar" style="width:{(n - p) / peak * 220:.0f}px"></span>')
        rows.append(f'<tr><td><code>{_e(session)}</code></td><td class="num">{n}</td>'
                    f'<td class="num">{p if bundle.failure_at else "—"}</td><td>{bars}</td></tr>')
    more = (f'<p class="note">{len(t.sessions) - len(top)} more session(s) not listed.</p>'
            if len(t.sessions) > len(top) else "")
    return ('<table><tr><th>session</th><th class="num">records</th><th class="num">post-failure</th><th></th></tr>'
            + "".join(rows) + "</table>" + more)


def _value_cell(v: Any, present: bool) -> str:
    if not present:
        return '<td class="val"><span class="absent">absent</span></td>'
    return f'<td class="val"><pre>{_e(_json_text(v), VALUE_CHARS)}</pre></td>'


def _path_cell(c: dict, note: str = "") -> str:
    return f'<td class="path"><code>{_e(c["path"])}</code>{note}</td>'


def _change_row(c: dict) -> str:
    path = _path_cell(c)
    kind = c.get("kind")
    if kind == "text":
        pre = ("…" if c["more_before"] else "") + _e(c["context_before"])
        post = _e(c["context_after"]) + ("…" if c["more_after"] else "")
        old = f'<td class="val"><pre>{pre}<del>{_e(c["snapshot_changed"])}</del>{post}</pre></td>'
        new = f'<td class="val"><pre>{pre}<ins>{_e(c["live_changed"])}</ins>{post}</pre></td>'
        note = (f'<div class="note">text changed at character {c["offset"]}: {c["snapshot_length"]} → '
                f'{c["live_length"]} characters</div>')
        return f"<tr>{_path_cell(c, note)}{old}{new}</tr>"
    if kind == "vector":
        if c["snapshot_dims"] != c["live_dims"]:
            text = f"vector dimensions changed: {c['snapshot_dims']} → {c['live_dims']}"
        else:
            cos = "n/a" if c["cosine_distance"] is None else f"{c['cosine_distance']:.6g}"
            l2 = "n/a" if c["l2"] is None else f"{c['l2']:.6g}"
            text = (f"{c['changed_dims']} of {c['snapshot_dims']} dimensions changed; cosine distance {cos}; "
                    f"L2 distance {l2}")
        return f'<tr>{path}<td class="val" colspan="2">{_e(text)}</td></tr>'
    if kind == "bytes":
        text = (f"{c['snapshot_length']} → {c['live_length']} bytes, first difference at byte {c['offset']}; "
                f"sha256 {c['snapshot_sha256'][:16]}… → {c['live_sha256'][:16]}…")
        return f'<tr>{path}<td class="val" colspan="2">{_e(text)}</td></tr>'
    ch = c["change"]
    note = f'<div class="note">{_e(c["note"])}</div>' if c.get("note") else ""
    return (f"<tr>{_path_cell(c, note)}{_value_cell(c.get('snapshot'), ch != 'added')}"
            f"{_value_cell(c.get('live'), ch != 'removed')}</tr>")


def _record(d: dict) -> str:
    op = d["op"]
    post = d["post_failure"]
    badges = f'<span class="badge b-{_e(op)}">{_e(op)}</span>'
    if post is True:
        badges += ' <span class="badge b-post">post-failure</span>'
    elif post is False:
        badges += ' <span class="badge b-pre">before failure</span>'
    meta = [f"written {_e(d['written_at'])}" if d["written_at"] else "write time unknown"]
    if d.get("session") is not None:
        meta.append(f"session <code>{_e(d['session'])}</code>")
    head = (f"<header>{badges} <code>{_e(d['source'])}/{_e(d['stream'])}</code> key "
            f"<code>{_e(_key_text(d['key']))}</code> <span class=\"meta\">{' · '.join(meta)}</span></header>")
    changes = d["changes"]
    if not changes:
        body = ('<p class="note" style="margin:8px 12px">No field-level difference (the stored encodings differ '
                'only in key order).</p>')
    else:
        rows = "".join(_change_row(c) for c in changes[:MAX_CHANGES_PER_RECORD])
        more = (f'<tr><td colspan="3" class="note">{len(changes) - MAX_CHANGES_PER_RECORD} more change(s): '
                f'see <code>snapshotter quarantine diff</code></td></tr>' if len(changes) > MAX_CHANGES_PER_RECORD
                else "")
        body = (f'<table><tr><th>field</th><th>snapshot</th><th>live (quarantined)</th></tr>{rows}{more}</table>')
    cls = "rec is-post" if post is True else "rec"
    return f'<section class="{cls}">{head}{body}</section>'


def _settings(bundle: IncidentBundle) -> str:
    """The stream settings the restore put back (not records: no count or diff above holds
    them), each as the field-level difference of the stream's schema, snapshot against live."""
    parts = []
    for source, streams in sorted(bundle.plan.items()):
        for stream, counts in sorted(streams.items()):
            names = counts.get("settings") or []
            if not names:
                continue
            try:
                entry = bundle.stream(source, stream).doc
            except KeyError:
                entry = {}
            changes = diff_values(entry.get("snapshot_schema"), entry.get("schema"))
            rows = "".join(_change_row(c) for c in changes[:MAX_CHANGES_PER_RECORD])
            head = (f'<header><span class="badge b-modified">settings</span> <code>{_e(source)}/{_e(stream)}</code> '
                    f'<span class="meta">{_e(", ".join(map(str, names)))}</span></header>')
            body = (f"<table><tr><th>setting</th><th>snapshot (put back)</th><th>live (replaced)</th></tr>{rows}"
                    f"</table>" if rows else '<p class="note" style="margin:8px 12px">The stored schemas do not '
                    'show the difference.</p>')
            parts.append(f'<section class="rec">{head}{body}</section>')
    return "<h2>Settings put back</h2>" + "".join(parts) if parts else ""


def _records(bundle: IncidentBundle, t: _Tally, max_records: int) -> str:
    shown = t.post_details[:max_records]
    shown += t.other_details[:max_records - len(shown)]
    left_out = t.total - len(shown)
    intro = f'<p class="note">{len(shown)} of {t.total} record(s) shown'
    if bundle.failure_at:
        intro += ", post-failure writes first"
    intro += ".</p>"
    if left_out:
        intro += (f'<p class="note"><strong>{left_out} record(s) left out</strong> of this page; '
                  f'<code>snapshotter quarantine export {_e(bundle.incident)} --format parquet -o FILE</code> '
                  f'has every one.</p>')
    return intro + "".join(_record(d) for d in shown)


def render(repo: Repository, bundle: IncidentBundle | dict, *,
           max_records: int = MAX_RECORDS) -> tuple[str, dict]:
    """The report page and a summary of what it holds."""
    if not isinstance(bundle, IncidentBundle):
        bundle = IncidentBundle.from_json(bundle)
    t = _tally(repo, bundle, max_records)
    status = incident_status(repo, bundle.incident)
    shown = min(t.total, max_records)
    title = f"Incident {bundle.incident}"
    html = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1>"
        f"<p class=\"sub\">Writes quarantined by a restore to snapshot {_e(bundle.snapshot)} "
        f"(release {_e(bundle.release)})</p>"
        f"{_summary(bundle, status, t)}"
        f"<h2>Counts by source and stream</h2>{_counts_table(bundle, t)}"
        f"{_settings(bundle)}"
        f"<h2>Timeline of writes</h2>{_timeline(bundle, t)}"
        f"<h2>Most affected sessions</h2>{_sessions(bundle, t)}"
        f"<h2>Records</h2>{_records(bundle, t, max_records)}"
        f"<footer>Generated {_e(iso(utcnow()))} by snapshotter {_e(__version__)}. Values are previews; "
        f"<code>quarantine export</code> gives them exactly.</footer>"
        "</main></body></html>\n"
    )
    info = {"incident": bundle.incident, "records": t.total, "shown": shown, "left_out": t.total - shown,
            "timed": len(t.times), "sessions": len(t.sessions)}
    return html, info


def write_report(repo: Repository, bundle: IncidentBundle | dict, path: str, *, max_records: int = MAX_RECORDS) -> dict:
    """Write the report to ``path`` atomically; returns what :func:`render` summarises."""
    html, info = render(repo, bundle, max_records=max_records)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(html)
    info["path"] = path
    return info
