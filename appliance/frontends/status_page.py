"""The admin listener's `/status` page: one self-contained HTML document, no external assets.

The page carries no numbers of its own: its inline script fetches `status.json` (the snapshot of
`appliance.status`) once a second and writes the numbers into elements with stable ids
(`live-tunnels`, `rate-down`, `total-requests`, ...), each also carrying the raw value in
`data-value`, so a person watches it change and a test can read it. Text from traffic (targets,
user names, errors) only ever goes in through `textContent`, never as markup, and the
Content-Security-Policy allows nothing but this page's own script and style (by SHA-256), and
fetches to its own origin.
"""

from __future__ import annotations

import base64
import hashlib

CONTENT_TYPE = "text/html; charset=utf-8"

STYLE = """
:root { --ink: #1c2430; --muted: #6b7686; --line: #e2e6ec; --panel: #ffffff; --bg: #f3f5f8;
        --down: #1f77d0; --up: #e0752d; --ok: #2e9d5b; --bad: #c8373a; --live: #eaf3ff; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #1c2430; color: #fff; padding: 12px 24px; display: flex;
         align-items: baseline; justify-content: space-between; flex-wrap: wrap; gap: 8px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header h1 small { color: #9fb0c6; font-weight: 400; margin-left: 6px; }
header .meta { color: #c9d4e3; }
header .meta b { color: #fff; font-weight: 600; }
.state { padding: 2px 8px; border-radius: 10px; background: #3a4556; color: #fff; }
.state.ok { background: var(--ok); }
.state.bad { background: var(--bad); }
main { padding: 16px 24px 24px; display: grid; gap: 16px; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 16px; }
.card, .panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
.card { padding: 12px 16px; }
.label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card.down .value { color: var(--down); }
.card.up .value { color: var(--up); }
.sub { color: var(--muted); font-size: 12px; }
.panel { padding: 12px 16px; }
.panel h2 { margin: 0 0 8px; font-size: 13px; color: var(--muted); text-transform: uppercase;
            letter-spacing: .05em; font-weight: 600; }
.row { display: grid; grid-template-columns: 3fr 2fr; gap: 16px; }
.halves { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.live { display: grid; grid-template-columns: repeat(3, 1fr); gap: 8px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
.tile.active { background: var(--live); border-color: #b9d4f5; }
.tile .value { font-size: 24px; }
.totals { display: grid; grid-template-columns: repeat(6, 1fr); gap: 8px; }
.totals .value { font-size: 18px; }
#spark { width: 100%; height: 96px; display: block; }
#spark .grid { stroke: var(--line); stroke-width: 1; }
#spark-down { stroke: var(--down); fill: none; stroke-width: 2; }
#spark-up { stroke: var(--up); fill: none; stroke-width: 2; }
.legend { display: flex; gap: 16px; color: var(--muted); font-size: 12px; }
.legend .down::before, .legend .up::before { content: ""; display: inline-block; width: 10px;
  height: 10px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.legend .down::before { background: var(--down); }
.legend .up::before { background: var(--up); }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th { text-align: left; color: var(--muted); font-weight: 500; font-size: 12px;
     border-bottom: 1px solid var(--line); padding: 4px 6px; }
td { padding: 4px 6px; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
td.num, th.num { text-align: right; }
td.num, td.nowrap { white-space: nowrap; }
td.empty { color: var(--muted); font-style: italic; }
td.error { color: var(--bad); }
footer { color: var(--muted); font-size: 12px; }
@media (max-width: 900px) { .cards, .live, .totals, .row, .halves { grid-template-columns: 1fr 1fr; } }
"""

SCRIPT = """
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  let updates = 0;

  function bytes(n) {
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return (i === 0 ? Math.round(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + UNITS[i];
  }
  const count = (n) => Number(n).toLocaleString("en-US");
  function duration(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + "d " + h + "h " + m + "m";
    if (h) return h + "h " + m + "m";
    return m ? m + "m " + (s % 60) + "s" : s + "s";
  }
  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });

  function set(id, value, text) {
    const el = $(id);
    el.dataset.value = String(value);
    el.textContent = text === undefined ? count(value) : text;
    const tile = el.closest(".tile");
    if (tile) tile.classList.toggle("active", value > 0);
  }

  function rows(id, items, width, cells) {
    const body = document.createDocumentFragment();
    for (const item of items) {
      const tr = document.createElement("tr");
      for (const [text, cls] of cells(item)) {
        const td = document.createElement("td");
        td.textContent = text === null || text === undefined ? "-" : String(text);
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    if (!items.length) {
      const tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = width; td.className = "empty"; td.textContent = "none";
      tr.appendChild(td); body.appendChild(tr);
    }
    $(id).replaceChildren(body);
  }

  function spark(history) {
    const top = Math.max(1, ...history.map((h) => Math.max(h[1], h[2])));
    const step = 600 / Math.max(1, history.length - 1);
    const line = (i) => history.map((h, x) =>
      (x * step).toFixed(1) + "," + (92 - 88 * h[i] / top).toFixed(1)).join(" ");
    $("spark-down").setAttribute("points", line(2));
    $("spark-up").setAttribute("points", line(1));
    set("spark-peak", top, bytes(top) + "/s");
  }

  function render(s) {
    $("name").textContent = s.name || "appliance";
    $("version").textContent = s.version;
    set("uptime", s.uptime_seconds, duration(s.uptime_seconds));
    set("workers", s.workers);
    set("rate-down", s.rate.bytes_down_per_second, bytes(s.rate.bytes_down_per_second) + "/s");
    set("rate-up", s.rate.bytes_up_per_second, bytes(s.rate.bytes_up_per_second) + "/s");
    set("rate-requests", s.rate.requests_per_second, s.rate.requests_per_second.toFixed(1));
    const open = Object.values(s.open_by_listener).reduce((a, b) => a + b, 0);
    set("open-connections", open);
    const live = s.live;
    set("live-http1", live.http1);
    set("live-h2-streams", live.h2_streams);
    set("live-h2-connections", live.h2_connections);
    set("live-tunnels", live.tunnel);
    set("live-websockets", live.websocket);
    set("live-socks5", live.socks5);
    set("live-transparent", live.transparent);
    const t = s.totals;
    set("total-requests", t.requests);
    set("total-connections", t.connections);
    set("total-down", t.bytes_down, bytes(t.bytes_down));
    set("total-up", t.bytes_up, bytes(t.bytes_up));
    set("total-errors", t.errors);
    set("total-denials", t.denials);
    spark(s.history);
    rows("listeners", s.listeners, 3,
         (l) => [[l.kind], [l.address], [l.open === undefined ? "-" : count(l.open), "num"]]);
    rows("top-destinations", s.top_destinations, 3,
         (d) => [[d.host], [count(d.requests), "num"], [bytes(d.bytes), "num"]]);
    rows("recent-errors", s.recent_errors, 5, (e) =>
         [[clock(e.time), "nowrap"], [e.client, "nowrap"], [e.method + " " + e.target], [e.status, "num"],
          [e.error, "error"]]);
    rows("recent-denials", s.recent_denials, 5, (e) =>
         [[clock(e.time), "nowrap"], [e.user ? e.client + " (" + e.user + ")" : e.client, "nowrap"],
          [e.method + " " + e.target], [e.status, "num"], [e.rule || e.error]]);
  }

  function state(text, cls) { const el = $("state"); el.textContent = text; el.className = "state " + cls; }

  async function poll() {
    try {
      const answer = await fetch("status.json", { cache: "no-store" });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      render(await answer.json());
      updates += 1;
      set("updates", updates);
      $("updated").textContent = clock(Date.now() / 1000);
      state("live", "ok");
    } catch (err) {
      state("no answer: " + err.message, "bad");
    } finally {
      setTimeout(poll, 1000);
    }
  }
  poll();
})();
"""

BODY = """<header>
  <h1><span id="name">appliance</span><small>status</small></h1>
  <div class="meta">version <b id="version">-</b> &middot; up <b id="uptime">-</b> &middot;
    <b id="workers">-</b> worker(s) &middot; <span id="state" class="state">connecting</span></div>
</header>
<main>
  <section class="cards">
    <div class="card down"><div class="label">Download</div><div class="value" id="rate-down">-</div>
      <div class="sub">origins to clients, last 10 s</div></div>
    <div class="card up"><div class="label">Upload</div><div class="value" id="rate-up">-</div>
      <div class="sub">clients to origins, last 10 s</div></div>
    <div class="card"><div class="label">Requests per second</div>
      <div class="value" id="rate-requests">-</div><div class="sub">requests and tunnels ended</div></div>
    <div class="card"><div class="label">Open connections</div>
      <div class="value" id="open-connections">-</div><div class="sub">clients connected now</div></div>
  </section>
  <div class="row">
    <section class="panel">
      <h2>Live connections by protocol</h2>
      <div class="live">
        <div class="tile"><div class="label">HTTP/1.1</div><div class="value" id="live-http1">-</div>
          <div class="sub">client connections</div></div>
        <div class="tile"><div class="label">HTTP/2 streams</div>
          <div class="value" id="live-h2-streams">-</div>
          <div class="sub">on <span id="live-h2-connections">-</span> connections</div></div>
        <div class="tile"><div class="label">Tunnels</div><div class="value" id="live-tunnels">-</div>
          <div class="sub">CONNECT, relaying</div></div>
        <div class="tile"><div class="label">WebSocket</div><div class="value" id="live-websockets">-</div>
          <div class="sub">upgraded, relaying</div></div>
        <div class="tile"><div class="label">SOCKS5</div><div class="value" id="live-socks5">-</div>
          <div class="sub">client connections</div></div>
        <div class="tile"><div class="label">Transparent</div><div class="value" id="live-transparent">-</div>
          <div class="sub">redirected connections</div></div>
      </div>
    </section>
    <section class="panel">
      <h2>Bytes per second, last 60 s</h2>
      <svg id="spark" viewBox="0 0 600 96" preserveAspectRatio="none" role="img"
           aria-label="bytes per second, last 60 seconds">
        <line class="grid" x1="0" y1="4" x2="600" y2="4"/><line class="grid" x1="0" y1="48" x2="600" y2="48"/>
        <line class="grid" x1="0" y1="92" x2="600" y2="92"/>
        <polyline id="spark-down" points=""/><polyline id="spark-up" points=""/>
      </svg>
      <div class="legend"><span class="down">download</span><span class="up">upload</span>
        <span>peak <span id="spark-peak">-</span></span></div>
    </section>
  </div>
  <section class="panel">
    <h2>Since start</h2>
    <div class="totals">
      <div><div class="label">Requests</div><div class="value" id="total-requests">-</div></div>
      <div><div class="label">Connections</div><div class="value" id="total-connections">-</div></div>
      <div><div class="label">Downloaded</div><div class="value" id="total-down">-</div></div>
      <div><div class="label">Uploaded</div><div class="value" id="total-up">-</div></div>
      <div><div class="label">Errors</div><div class="value" id="total-errors">-</div></div>
      <div><div class="label">Denials</div><div class="value" id="total-denials">-</div></div>
    </div>
  </section>
  <div class="halves">
    <section class="panel"><h2>Listeners</h2>
      <table><thead><tr><th>kind</th><th>address</th><th class="num">open</th></tr></thead>
        <tbody id="listeners"></tbody></table></section>
    <section class="panel"><h2>Top destinations</h2>
      <table><thead><tr><th>host</th><th class="num">requests</th><th class="num">bytes</th></tr></thead>
        <tbody id="top-destinations"></tbody></table></section>
  </div>
  <div class="halves">
    <section class="panel"><h2>Recent errors</h2>
      <table><thead><tr><th>time</th><th>client</th><th>request</th><th class="num">status</th>
        <th>error</th></tr></thead><tbody id="recent-errors"></tbody></table></section>
    <section class="panel"><h2>Recent denials</h2>
      <table><thead><tr><th>time</th><th>client</th><th>request</th><th class="num">status</th>
        <th>rule</th></tr></thead><tbody id="recent-denials"></tbody></table></section>
  </div>
  <footer>Refreshed every second from <a href="status.json">status.json</a>, without reloading;
    last update <span id="updated">never</span> (<span id="updates" data-value="0">0</span> since this
    page opened).</footer>
</main>"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>Appliance status</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{BODY}\n'
        f'<script>{SCRIPT}</script>\n</body>\n</html>\n').encode()

# Only this page's own script and style run; it may fetch its own origin and nothing else.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
                           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("Cache-Control", "no-store"),
           ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))


def status_page(_headers=()) -> tuple[int, str, bytes, tuple]:
    """The admin route for `/status`."""
    return 200, CONTENT_TYPE, PAGE, HEADERS
