"""The dashboard's page, stylesheet and script: self-contained (nothing fetched from elsewhere),
kept in the package as strings so an installed daemon serves them without data files.
The script fills the page with textContent only: nothing from the status is parsed as HTML."""

from __future__ import annotations

import html

_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/dashboard/style.css">
<link rel="icon" href="data:,">
</head>"""


def login(message: str | None) -> str:
    """The login form; `message` (ours, never the submitted token) says why it shows again."""
    msg = f'<p class="login-error" role="alert">{html.escape(message)}</p>' if message else ""
    return _HEAD.format(title="geomirror — log in") + f"""
<body class="login-body">
<form class="login" method="post" action="/dashboard/login" autocomplete="off">
  <h1>geomirror dashboard</h1>
  <p>Paste this site's control token (the file <code>control.token</code> in the site's state directory).</p>
  {msg}
  <label for="token">Control token</label>
  <input id="token" name="token" type="password" required autofocus spellcheck="false">
  <button type="submit">Log in</button>
</form>
</body></html>"""


PAGE = _HEAD.format(title="geomirror dashboard") + """
<body>
<header class="top">
  <div class="brand">geomirror <span id="here-name"></span></div>
  <div class="live"><span id="live-dot" class="dot"></span><span id="live-text">connecting…</span></div>
  <form method="post" action="/dashboard/logout"><button class="logout" type="submit">Log out</button></form>
</header>
<main>
  <section id="headline" class="headline level-warn">
    <div id="headline-title" class="headline-title">…</div>
    <div id="headline-text" class="headline-text">Waiting for the first update.</div>
  </section>
  <section id="sites" class="sites"></section>
  <p id="peer-note" class="note"></p>
  <div class="lower">
    <section class="panel">
      <h2>Recent events</h2>
      <table class="timeline"><thead><tr><th>time</th><th>event</th><th>details</th></tr></thead>
      <tbody id="timeline"></tbody></table>
    </section>
    <section class="panel">
      <h2>Drills</h2>
      <div id="drills"></div>
    </section>
  </div>
</main>
<script src="/dashboard/app.js"></script>
</body></html>"""


STYLE = """
:root { --ok:#1a7f37; --okbg:#dafbe1; --warn:#9a6700; --warnbg:#fff8c5; --bad:#cf222e; --badbg:#ffebe9;
  --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --card:#ffffff; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color:var(--fg); background:var(--bg); }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 0.95em; }
.top { display:flex; align-items:center; gap:1.5rem; padding:0.6rem 1.2rem; background:#24292f; color:#fff; }
.brand { font-weight:700; font-size:1.15rem; flex:1; }
.brand span { font-weight:400; opacity:0.8; margin-left:0.4rem; }
.live { display:flex; align-items:center; gap:0.45rem; font-size:0.95rem; }
.dot { width:0.75rem; height:0.75rem; border-radius:50%; background:#8c959f; display:inline-block; }
.dot.on { background:#2da44e; } .dot.stale { background:#cf222e; }
.logout { background:transparent; color:#fff; border:1px solid #8c959f; border-radius:6px; padding:0.25rem 0.7rem;
  cursor:pointer; font:inherit; }
main { padding:1rem 1.2rem 2rem; max-width:1400px; margin:0 auto; }
.headline { border-radius:10px; padding:0.9rem 1.2rem; border:2px solid; display:flex; gap:1.2rem; align-items:baseline; }
.headline-title { font-size:1.9rem; font-weight:800; letter-spacing:0.02em; white-space:nowrap; }
.headline-text { font-size:1.15rem; }
.level-ok { background:var(--okbg); border-color:var(--ok); color:#0f5323; }
.level-warn { background:var(--warnbg); border-color:var(--warn); color:#6b4a00; }
.level-bad { background:var(--badbg); border-color:var(--bad); color:#8a1520; }
.sites { display:grid; grid-template-columns: 1fr 1fr; gap:1rem; margin-top:1rem; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:0.9rem 1.1rem; }
.card-head { display:flex; align-items:center; gap:0.8rem; margin-bottom:0.6rem; }
.card-name { font-size:1.45rem; font-weight:700; }
.card-source { color:var(--muted); font-size:0.9rem; flex:1; }
.role { font-size:1.15rem; font-weight:800; text-transform:uppercase; padding:0.2rem 0.8rem; border-radius:999px;
  color:#fff; background:#57606a; }
.role-primary { background:var(--ok); } .role-standby { background:#0969da; }
.role-fenced, .role-not-replicating, .role-not-heard, .role-unknown { background:var(--bad); }
.role.changed { animation: flash 1.2s ease-in-out 3; }
@keyframes flash { 50% { box-shadow: 0 0 0 6px #ffd33d; } }
.facts { width:100%; border-collapse:collapse; }
.facts th { text-align:left; font-weight:500; color:var(--muted); padding:0.22rem 0.8rem 0.22rem 0; width:42%;
  vertical-align:top; }
.facts td { padding:0.22rem 0; font-variant-numeric: tabular-nums; font-weight:600; }
.facts tr + tr th, .facts tr + tr td { border-top:1px solid #eef1f4; }
.good { color:var(--ok); } .bad { color:var(--bad); } .muted { color:var(--muted); font-weight:400; }
.alarms { margin:0.6rem 0 0; padding:0.5rem 0.8rem; background:var(--badbg); border-radius:6px; color:#8a1520;
  list-style:none; }
.note { color:var(--muted); font-size:0.9rem; margin:0.5rem 0 0; }
.lower { display:grid; grid-template-columns: 3fr 2fr; gap:1rem; margin-top:1rem; }
.panel { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:0.8rem 1.1rem; min-width:0; }
.panel h2 { margin:0 0 0.5rem; font-size:1.1rem; }
table.timeline, table.drills { width:100%; border-collapse:collapse; font-size:0.92rem; }
.timeline th, .drills th { text-align:left; color:var(--muted); font-weight:500; border-bottom:1px solid var(--line);
  padding:0.2rem 0.5rem 0.2rem 0; }
.timeline td, .drills td { padding:0.2rem 0.5rem 0.2rem 0; border-bottom:1px solid #eef1f4; vertical-align:top; }
.timeline td:first-child { white-space:nowrap; font-variant-numeric: tabular-nums; color:var(--muted); }
.timeline td:nth-child(2) { white-space:nowrap; font-weight:600; }
.timeline td:nth-child(3) { color:var(--muted); overflow-wrap:anywhere; }
.ev-bad td:nth-child(2) { color:var(--bad); } .ev-good td:nth-child(2) { color:var(--ok); }
.verdict { font-weight:700; text-transform:uppercase; }
.verdict-pass { color:var(--ok); } .verdict-fail, .verdict-aborted, .verdict-rolled_back, .verdict-refused { color:var(--bad); }
.empty { color:var(--muted); font-style:italic; }
a { color:#0969da; }
.login-body { display:flex; min-height:100vh; align-items:center; justify-content:center; }
.login { background:#fff; border:1px solid var(--line); border-radius:10px; padding:1.5rem 2rem; width:28rem; }
.login h1 { margin-top:0; font-size:1.4rem; }
.login label { display:block; font-weight:600; margin:0.8rem 0 0.3rem; }
.login input { width:100%; font:inherit; padding:0.45rem; border:1px solid var(--line); border-radius:6px; }
.login button { margin-top:1rem; font:inherit; padding:0.45rem 1.2rem; border-radius:6px; border:0;
  background:#1f883d; color:#fff; cursor:pointer; }
.login-error { color:var(--bad); font-weight:600; }
@media (max-width: 900px) { .sites, .lower { grid-template-columns: 1fr; } .headline { flex-direction:column; } }
"""


SCRIPT = r"""
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text); return e; };
  const lastRole = {};
  let lastUpdate = 0, updates = 0;
  window.gmLoadedAt = Date.now();

  function num(v, unit, digits) {
    if (v === null || v === undefined) return '—';
    const n = Number(v);
    const s = digits === undefined ? n.toLocaleString('en-US') : n.toFixed(digits);
    return unit ? s + ' ' + unit : s;
  }
  function bytes(v) {
    if (v === null || v === undefined) return '—';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let n = Number(v), i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + ' ' + u[i];
  }
  function clock(wall) {
    const d = new Date(wall * 1000);
    return d.toLocaleTimeString('en-GB', { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
  }
  function ago(wall) {
    const s = Math.max(0, Date.now() / 1000 - wall);
    if (s < 90) return Math.round(s) + ' s ago'; if (s < 5400) return Math.round(s / 60) + ' min ago';
    if (s < 172800) return Math.round(s / 3600) + ' h ago'; return Math.round(s / 86400) + ' days ago';
  }
  function yesno(v, yes, no, goodWhen) {
    if (v === null || v === undefined) return ['—', ''];
    return [v ? yes : no, (v === goodWhen) ? 'good' : 'bad'];
  }

  function rows(c) {
    if (c.source === 'this site') {
      const nb = Object.entries(c.bgp_neighbors || {}).map(([k, v]) => k + ' ' + v).join(', ');
      const running = c.runs_guest;
      return [
        ['HA state', [c.ha_state.replace(/_/g, ' ')]],
        ['Lease generation', [num(c.lease_generation) + (c.holding_lease ? ' (held here)' : '')]],
        ['Committed epoch', [num(c.committed_epoch)]],
        ['Replication', [c.replication_state || '—', c.replication_state === 'protected' || c.replication_state === 'replicating' ? 'good' : 'bad']],
        ['Checkpoints', running ? (c.checkpoints_per_s === null ? ['measuring…', 'muted'] : [num(c.checkpoints_per_s, '/s', 1)]) : ['none here (not running the guest)', 'muted']],
        ['Interval', running ? [num(c.interval_ms, 'ms') + (c.interval_reason ? ' — ' + c.interval_reason : '')] : ['—']],
        ['Last pause', [num(c.last_pause_ms, 'ms', 1)]],
        ['RTT to peer', [num(c.rtt_ms, 'ms', 2)]],
        ['Backlog', [num(c.backlog_epochs, c.backlog_epochs === 1 ? 'epoch' : 'epochs'), c.backlog_epochs > 2 ? 'bad' : '']],
        ['WAN sent', running ? [bytes(c.wan_bytes) + (c.wan_bytes_per_s !== null ? '  (' + bytes(c.wan_bytes_per_s) + '/s)' : '')] : ['—']],
        ['BGP', [(c.bgp_announced ? 'announcing the prefix' : c.bgp_backup ? 'announcing the backup path' : 'not announcing') + (nb ? ' · ' + nb : '')]],
      ];
    }
    return [
      ['Heard (heartbeats)', yesno(c.heard, 'yes', 'no', true)],
      ['Lease generation', [num(c.lease_generation) + ' (from its heartbeats)']],
      ['Committed epoch', [c.committed_epoch === null ? '—' : num(c.committed_epoch) + ' (acknowledged)']],
      ['RTT', [num(c.rtt_ms, 'ms', 2)]],
      ['Its route upstream', [c.route_seen === null || c.route_seen === undefined ? '—' : (c.route_seen ? 'seen' : 'not seen'), 'muted']],
      ['Witness (from here)', yesno(c.witness_reachable, 'reachable', 'unreachable', true)],
      ['Certificate', [c.cert_serial || '—', 'muted']],
    ];
  }

  function card(c) {
    const box = el('article', 'card'); box.dataset.site = c.name;
    const head = el('div', 'card-head');
    head.append(el('span', 'card-name', c.name), el('span', 'card-source', c.source));
    const roleCls = 'role role-' + String(c.role).replace(/[^a-z]+/gi, '-').toLowerCase();
    const role = el('span', roleCls, c.role); role.dataset.field = 'role';
    if (lastRole[c.name] !== undefined && lastRole[c.name] !== c.role) role.classList.add('changed');
    lastRole[c.name] = c.role;
    head.append(role); box.append(head);
    const t = el('table', 'facts');
    for (const [k, [v, cls]] of rows(c)) {
      const tr = el('tr'); tr.append(el('th', '', k)); tr.append(el('td', cls || '', v)); t.append(tr);
    }
    box.append(t);
    if (c.alarms && c.alarms.length) {
      const ul = el('ul', 'alarms'); for (const a of c.alarms) ul.append(el('li', '', '⚠ ' + a)); box.append(ul);
    }
    return box;
  }

  const BAD = /(lost|failed|exited|fence|left|unusable|refused|abort|retry|withdrawn)/;
  const GOOD = /(entered|granted|announced|done|ready|resumed)/;
  function details(e) {
    return Object.entries(e).filter(([k]) => !['t', 'wall', 'event', 'site'].includes(k))
      .map(([k, v]) => k + '=' + (typeof v === 'object' ? JSON.stringify(v) : v)).join('  ');
  }

  function render(v) {
    const h = v.headline;
    $('headline').className = 'headline level-' + h.level;
    $('headline-title').textContent = h.title; $('headline-text').textContent = h.text;
    $('here-name').textContent = '· ' + v.sites[0].name;
    document.title = h.title + ' · ' + v.sites[0].name + ' · geomirror';
    const sites = $('sites'); sites.replaceChildren(...v.sites.map(card));
    $('peer-note').textContent = v.peer_note;
    const tb = $('timeline'); tb.replaceChildren();
    for (const e of v.timeline.slice(0, 25)) {
      const tr = el('tr', BAD.test(e.event) ? 'ev-bad' : (GOOD.test(e.event) ? 'ev-good' : ''));
      tr.append(el('td', '', clock(e.wall)), el('td', '', e.event), el('td', '', details(e)));
      tb.append(tr);
    }
    const d = $('drills'); d.replaceChildren();
    if (!v.drills.length) {
      d.append(el('p', 'empty', 'No drills yet. Run one with “geomirror drill”; its report is listed here.'));
    } else {
      const t = el('table', 'drills');
      const hr = el('tr'); for (const k of ['when', 'verdict', 'moves', 'epochs lost', 'report']) hr.append(el('th', '', k));
      t.append(hr);
      for (const r of v.drills) {
        const tr = el('tr');
        const when = typeof r.when === 'number' ? ago(r.when) : String(r.when);
        tr.append(el('td', '', when), el('td', 'verdict verdict-' + r.verdict.toLowerCase(), r.verdict));
        tr.append(el('td', '', r.moves.join(', ') + (r.reason ? ' — ' + r.reason : '')), el('td', '', r.epochs_lost === null ? '—' : r.epochs_lost));
        const links = el('td');
        if (r.html) { const a = el('a', '', 'report'); a.href = r.html; links.append(a, ' '); }
        const j = el('a', '', 'json'); j.href = r.json; links.append(j);
        tr.append(links); t.append(tr);
      }
      d.append(t);
    }
    lastUpdate = Date.now(); updates++;
    document.body.dataset.updates = String(updates);
    liveness();
  }

  function liveness() {
    const age = (Date.now() - lastUpdate) / 1000;
    const dot = $('live-dot'), txt = $('live-text');
    if (!lastUpdate) { dot.className = 'dot'; txt.textContent = 'connecting…'; return; }
    if (age > 5) { dot.className = 'dot stale'; txt.textContent = 'NO UPDATES for ' + Math.round(age) + ' s — reconnecting'; }
    else { dot.className = 'dot on'; txt.textContent = 'live · updated ' + new Date(lastUpdate).toLocaleTimeString('en-GB', { hour12: false }); }
  }
  setInterval(liveness, 1000);

  function connect() {
    const es = new EventSource('/dashboard/events');
    es.addEventListener('view', (m) => render(JSON.parse(m.data)));
    es.onerror = () => {
      // a 401 (session expired, token rotated) ends the stream for good: back to the login form
      fetch('/dashboard/data', { credentials: 'same-origin' }).then((r) => {
        if (r.status === 401) { es.close(); window.location.assign('/dashboard/login'); }
      }).catch(() => {});
    };
  }
  connect();
})();
"""
