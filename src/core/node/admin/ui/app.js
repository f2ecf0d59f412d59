// meshgate's dashboard: one live view of the node, read-only.
//
// Everything shown comes from /api/v1/events (the overview once a second,
// as server-sent events read with fetch so the token can travel in a
// header). Every string from the node is put in the page as a text node
// (el() below), never parsed as markup: a SOCKS user called <script> is
// shown as those characters.
'use strict';

const TOKEN_KEY = 'meshgate-admin-token';
const LINKS = new Set(['ssh_link', 'h2_link', 'quic_link', 'link_group']);
const MAX_TENANT_ROWS = 1000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  selected: new URLSearchParams(location.hash.slice(1)).get('tenant'),
  filter: '',
  abort: null,
  retryTimer: null,
  last: null,
};

// Numbers a test (or a curious operator) can read: updates received, the
// size of the last one and how long it took to draw.
window.meshgateStats = { updates: 0, lastBytes: 0, maxBytes: 0, lastRenderMs: 0, maxRenderMs: 0, firstRenderMs: null };
const loadStart = performance.now();

function $(id) { return document.getElementById(id); }

// An element with attributes and children; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'title') e.title = String(v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function bytes(n) {
  if (!n) return '0 B';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function age(secs) {
  if (secs === null || secs === undefined) return 'never';
  secs = Math.floor(secs);
  if (secs < 60) return secs + ' s';
  if (secs < 3600) return Math.floor(secs / 60) + ' min ' + (secs % 60) + ' s';
  return Math.floor(secs / 3600) + ' h ' + Math.floor((secs % 3600) / 60) + ' min';
}

function headers() {
  return state.token ? { Authorization: 'Bearer ' + state.token } : {};
}

function setLive(text, bad) {
  const b = $('live');
  b.textContent = text;
  b.className = bad ? 'badge bad' : 'badge';
}

function askToken(message) {
  if (state.abort) state.abort.abort();
  $('main').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setLive('needs the token', true);
  $('token').focus();
}

function retry() {
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, 2000);
}

async function connect() {
  clearTimeout(state.retryTimer);
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  const url = '/api/v1/events' + (state.selected ? '?tenant=' + encodeURIComponent(state.selected) : '');
  let resp;
  try {
    // Whether the token opens the API, asked where a refusal is an answer
    // (not a failed request).
    const auth = await fetch('/ui/auth', { headers: headers(), signal: abort.signal, cache: 'no-store' });
    const a = auth.ok ? await auth.json() : { authorized: true };
    if (!a.authorized) {
      askToken(state.token ? 'That token was refused.' : '');
      return;
    }
    resp = await fetch(url, { headers: headers(), signal: abort.signal, cache: 'no-store' });
  } catch (e) {
    if (abort.signal.aborted) return;
    setLive('disconnected', true);
    retry();
    return;
  }
  if (resp.status === 401) {
    askToken(state.token ? 'That token was refused.' : '');
    return;
  }
  if (!resp.ok) {
    setLive('HTTP ' + resp.status, true);
    retry();
    return;
  }
  $('login').hidden = true;
  $('main').hidden = false;
  setLive('live', false);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const chunk = buf.slice(0, i);
        buf = buf.slice(i + 2);
        onEvent(chunk);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (abort.signal.aborted) return;
  setLive('reconnecting', true);
  retry();
}

function onEvent(chunk) {
  let data = '';
  for (const line of chunk.split('\n')) {
    if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (!data) return;
  const t0 = performance.now();
  const overview = JSON.parse(data);
  state.last = overview;
  render(overview);
  const s = window.meshgateStats;
  s.updates += 1;
  s.lastBytes = data.length;
  s.lastRenderMs = performance.now() - t0;
  s.maxBytes = Math.max(s.maxBytes, data.length);
  s.maxRenderMs = Math.max(s.maxRenderMs, s.lastRenderMs);
  if (s.firstRenderMs === null) s.firstRenderMs = performance.now() - loadStart;
  document.body.dataset.updates = String(s.updates);
}

function select(name) {
  state.selected = name;
  history.replaceState(null, '', name ? '#tenant=' + encodeURIComponent(name) : '#');
  if (state.last) render(state.last);
  connect();
}

function replaceRows(table, rows) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...rows);
}

function render(o) {
  const n = o.node || {};
  $('node').textContent = n.node || '';
  $('facts').textContent = 'v' + (n.version || '?') + ' · up ' + age(n.uptime_secs) + ' · ' +
    (o.flows_total || 0) + ' live flows · ' + (n.store || '');
  const problems = [];
  for (const r of n.refused || []) problems.push('refused ' + r.instance + ': ' + r.reason);
  for (const f of n.faults || []) problems.push('fault ' + f.instance + ': ' + f.reason);
  if (n.ready === false) problems.push('not ready');
  $('problems').hidden = problems.length === 0;
  $('problems').replaceChildren(...problems.map((p) => el('div', {}, p)));
  renderTenants(o.tenants || []);
  renderDetail(o.tenant);
}

function renderTenants(tenants) {
  $('tenant-count').textContent = '(' + tenants.length + ')';
  const f = state.filter;
  const shown = tenants.filter((t) => !f || t.name.toLowerCase().includes(f));
  const rows = shown.slice(0, MAX_TENANT_ROWS).map((t) => {
    const refusals = Object.entries(t.refusals || {});
    const total = refusals.reduce((a, [, c]) => a + c, 0);
    const bad = total > 0 || t.problems > 0;
    return el('tr', { class: (t.name === state.selected ? 'selected ' : '') + (t.problems > 0 ? 'bad' : '') },
      el('td', {}, el('button', { class: 'link', type: 'button', onclick: () => select(t.name) }, t.name)),
      el('td', {}, t.instances + (t.problems ? ' (' + t.problems + ' not running)' : '')),
      el('td', {}, t.active_flows),
      el('td', { title: bytes(t.bytes_live) + ' in live flows' }, bytes(t.bytes)),
      el('td', { class: bad ? 'bad' : '', title: refusals.map(([r, c]) => r + ': ' + c).join('\n') },
        total ? refusals.map(([r, c]) => r + ' ' + c).join(', ') : '0'));
  });
  replaceRows('tenants', rows);
  $('tenants-more').textContent = shown.length > MAX_TENANT_ROWS
    ? (shown.length - MAX_TENANT_ROWS) + ' more: filter to find them' : '';
}

function renderDetail(t) {
  const show = !!(t && t.name === state.selected);
  $('pick').hidden = show;
  $('tenant-detail').hidden = !show;
  if (!show) return;
  $('tenant-name').textContent = 'Tenant ' + t.name;
  const modules = t.modules || [];
  const refusalsOf = {};
  for (const r of t.refusals || []) {
    (refusalsOf[r.instance] = refusalsOf[r.instance] || []).push(r.reason + ' ' + r.count);
  }
  const vnets = modules.filter((m) => m.kind === 'vnet');
  replaceRows('vnets', vnets.map((m) => el('tr', {},
    el('td', {}, m.instance + (m.details.default ? ' (default)' : '')),
    el('td', {}, m.details.engine || 'userspace'),
    el('td', {}, (m.details.routes || []).join(', ')),
    el('td', {}, Object.entries(m.details.hosts || {}).map(([h, a]) => h + ' = ' + a).join(', ')))));
  const peerRows = [];
  for (const m of modules.filter((m) => m.kind === 'wireguard')) {
    for (const p of m.details.peers || []) {
      const stale = p.latest_handshake_secs === null || p.latest_handshake_secs > 180;
      peerRows.push(el('tr', { class: stale ? 'bad' : '' },
        el('td', {}, m.instance),
        el('td', { title: p.public_key }, p.name),
        el('td', {}, p.endpoint || 'none'),
        el('td', { class: 'handshake' }, age(p.latest_handshake_secs)),
        el('td', {}, bytes(p.rx_bytes)),
        el('td', {}, bytes(p.tx_bytes)),
        el('td', {}, (p.allowed_ips || []).join(', '))));
    }
  }
  replaceRows('peers', peerRows);
  const links = modules.filter((m) => LINKS.has(m.kind));
  replaceRows('links', links.map((m) => {
    const d = m.details || {};
    const up = d.connected === true || (m.kind === 'link_group' && d.active);
    return el('tr', { class: up ? '' : 'bad' },
      el('td', {}, m.instance),
      el('td', {}, m.kind.replace('_link', '')),
      el('td', {}, d.server || (d.links ? d.links.map((l) => l.name || l.instance || '').join(', ') : '')),
      el('td', {}, up ? 'up' + (d.active ? ' (' + d.active + ')' : '') : 'down' + (d.last_error ? ': ' + d.last_error : '')),
      el('td', {}, typeof d.rtt_ms === 'number' ? d.rtt_ms.toFixed(1) + ' ms' : ''),
      el('td', {}, d.reconnects ?? ''));
  }));
  const doors = modules.filter((m) => m.kind !== 'vnet' && m.kind !== 'wireguard' && !LINKS.has(m.kind));
  replaceRows('doors', doors.map((m) => {
    const bad = m.state !== 'running' || m.last_error;
    const d = m.details || {};
    return el('tr', { class: bad ? 'bad' : '' },
      el('td', {}, m.instance),
      el('td', {}, m.kind),
      el('td', {}, m.state + (m.last_error ? ': ' + m.last_error : '')),
      el('td', {}, d.active ?? m.active_flows),
      el('td', {}, d.listen || ''),
      el('td', { class: refusalsOf[m.instance] ? 'bad' : '' }, (refusalsOf[m.instance] || []).join(', ')));
  }));
  const flows = (t.flows || []).slice().reverse();
  $('flow-count').textContent = t.flows_total > flows.length
    ? '(newest ' + flows.length + ' of ' + t.flows_total + ')' : '(' + flows.length + ')';
  replaceRows('flows', flows.map((f) => el('tr', { class: f.verdict === 'deny' ? 'bad' : '', 'data-flow': f.id },
    el('td', {}, f.id),
    el('td', {}, f.instance),
    el('td', {}, f.src),
    el('td', { class: 'identity' }, f.identity || ''),
    el('td', {}, f.dst),
    el('td', {}, f.route || ''),
    el('td', {}, f.verdict + (f.reason ? ': ' + f.reason : '')),
    el('td', {}, bytes(f.bytes_up)),
    el('td', {}, bytes(f.bytes_down)),
    el('td', {}, age(f.age_secs)))));
  drawTopology(t, vnets, links, doors);
}

// The node at the corner, the tenant in the middle with its modules around
// it, WireGuard peers and link servers outside them.
function drawTopology(t, vnets, links, doors) {
  const g = $('topology');
  const W = 800, H = 360, cx = W / 2, cy = H / 2;
  const items = [];
  for (const m of vnets) items.push({ label: m.instance, cls: 'node-vnet', kids: [] });
  for (const m of (t.modules || []).filter((m) => m.kind === 'wireguard')) {
    const peers = (m.details.peers || []).map((p) => ({
      label: p.name, cls: p.latest_handshake_secs === null || p.latest_handshake_secs > 180 ? 'down' : 'node-peer',
    }));
    items.push({ label: m.instance, cls: 'node-wireguard', kids: peers });
  }
  for (const m of links) {
    const d = m.details || {};
    const up = d.connected === true || (m.kind === 'link_group' && d.active);
    items.push({ label: m.instance, cls: up ? 'node-link' : 'down', kids: d.server ? [{ label: d.server, cls: up ? 'node-link' : 'down' }] : [] });
  }
  for (const m of doors.slice(0, 24)) items.push({ label: m.instance, cls: m.state === 'running' ? 'node-door' : 'down', kids: [] });
  const shapes = [];
  const labels = [];
  const r1 = 110, r2 = 165;
  items.forEach((it, i) => {
    const a = (2 * Math.PI * i) / Math.max(items.length, 1) - Math.PI / 2;
    const x = cx + r1 * 1.7 * Math.cos(a), y = cy + r1 * Math.sin(a);
    shapes.push(svg('line', { x1: cx, y1: cy, x2: x, y2: y }));
    it.kids.forEach((k, j) => {
      const b = a + (j - (it.kids.length - 1) / 2) * 0.18;
      const kx = cx + r2 * 2.2 * Math.cos(b), ky = cy + r2 * Math.sin(b);
      shapes.push(svg('line', { x1: x, y1: y, x2: kx, y2: ky }));
      shapes.push(svg('circle', { cx: kx, cy: ky, r: 5, class: k.cls }));
      labels.push(svg('text', { x: kx + 7, y: ky + 4 }, k.label));
    });
    shapes.push(svg('circle', { cx: x, cy: y, r: 8, class: it.cls }));
    labels.push(svg('text', { x: x + 10, y: y + 4 }, it.label));
  });
  // The node this tenant runs on, to the left.
  const nx = 40, ny = 30;
  shapes.push(svg('line', { x1: nx, y1: ny, x2: cx, y2: cy }));
  shapes.push(svg('circle', { cx: nx, cy: ny, r: 10, class: 'node-node' }));
  labels.push(svg('text', { x: nx + 13, y: ny + 4 }, 'node ' + ((state.last && state.last.node && state.last.node.node) || '')));
  shapes.push(svg('circle', { cx, cy, r: 12, class: 'node-tenant' }));
  labels.push(svg('text', { x: cx + 15, y: cy + 4 }, t.name));
  g.replaceChildren(...shapes, ...labels);
}

function init() {
  $('login').addEventListener('submit', (e) => {
    e.preventDefault();
    state.token = $('token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $('token').value = '';
    connect();
  });
  $('filter').addEventListener('input', (e) => {
    state.filter = e.target.value.trim().toLowerCase();
    if (state.last) renderTenants(state.last.tenants || []);
  });
  connect();
}

document.addEventListener('DOMContentLoaded', init);
