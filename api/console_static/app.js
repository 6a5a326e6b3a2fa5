// shardstate web console: plain JavaScript, no framework, no build step.
// Talks only to the HTTP API v1 of the server that served this page (same origin, cookie auth).
'use strict';

(() => {
  const API = '/api/v1';
  const MAX_EVENTS = 500;          // rows kept in the events panel
  const CLUSTER_POLL_MS = 2000;    // cluster panel refresh while visible
  const RECONCILE_MS = 30000;      // group counts re-read from the server (events keep them live between)
  const PREVIEW_CHARS = 120;

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- state

  const S = {
    tab: 'data',
    groups: new Map(),        // group -> count
    treeFilter: '',
    collapsed: new Set(),     // tree paths the user collapsed
    countEls: new Map(),      // group -> its count element (in-place updates)
    nsEls: new Map(),         // namespace path -> count element (sum of its groups)
    nsSums: new Map(),        // namespace path -> items under it
    dirty: new Set(),         // groups whose count moved since the last paint
    incoming: [],             // event records not yet in the events panel (oldest first)
    selected: null,           // selected group
    page: { cursors: [null], index: 0, next: null, limit: 50, prefix: '', seq: 0, replay: null, refresh: null },
    rows: new Map(),          // key -> {item, tr} for the visible page
    sortedKeys: [],           // the visible page's keys, sorted
    current: null,            // {key, value, version, gone} shown in the side panel
    editing: false,
    editBase: null,           // version the open edit started from
    conflict: null,           // {value, version} or {gone: true}
    deleteForce: false,
    seen: new Set(), seenOrder: [],
    ev: { list: [], pending: [], paused: false, filter: '', unread: 0 },
    es: null, esOpened: false,
    clusterTimer: null,
  };

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, type, message, body) {
      super(`${type}: ${message}`);
      this.status = status; this.type = type; this.body = body;
    }
  }

  /** One API call: JSON in and out, the CSRF header on every request, errors as ApiError. */
  async function api(method, path, opts = {}) {
    const headers = { 'X-Shardstate': '1', Accept: 'application/json', ...(opts.headers || {}) };
    let body;
    if (opts.raw !== undefined) { body = opts.raw; headers['Content-Type'] = 'application/json'; }
    else if (opts.body !== undefined) { body = JSON.stringify(opts.body); headers['Content-Type'] = 'application/json'; }
    let res;
    try {
      res = await fetch(API + path, { method, headers, body, credentials: 'same-origin', cache: 'no-store' });
    } catch (err) {
      throw new ApiError(0, 'Unavailable', 'the console server did not answer', null);
    }
    const text = await res.text();
    let data = null;
    if (text) { try { data = JSON.parse(text); } catch (_) { data = null; } }
    if (res.status === 401) showLogin();
    if (!res.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(res.status, err.type || `HTTP ${res.status}`, err.message || res.statusText, data);
    }
    return { data, res };
  }

  const itemPath = (g, k) => `/groups/${enc(g)}/items/${enc(k)}`;

  // ---------------------------------------------------------------- small helpers

  const isPython = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) && v.$type === 'python';

  function preview(v) {
    if (isPython(v)) return `\u2039python\u203a ${v.repr ?? ''}`;
    let s = JSON.stringify(v);
    if (s === undefined) s = String(v);
    return s.length > PREVIEW_CHARS ? `${s.slice(0, PREVIEW_CHARS - 1)}\u2026` : s;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, val] of Object.entries(attrs)) {
      if (val === null || val === undefined || val === false) continue;
      if (name === 'class') node.className = val;
      else if (name === 'text') node.textContent = val;
      else node.setAttribute(name, val === true ? '' : String(val));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function toast(message, kind = 'info') {
    const t = el('div', { class: `toast ${kind}`, 'data-testid': 'toast', text: message });
    $('toasts').append(t);
    setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const errText = (e) => (e instanceof ApiError ? `${e.type}: ${e.message}` : String(e));

  /** A performance mark, the first time only (bench/console_load.py reads them). */
  function mark(name) {
    if (performance.getEntriesByName(name, 'mark').length === 0) performance.mark(name);
  }

  function debounce(fn, ms) {
    let t = null;
    return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
  }

  function flash(node) {
    node.classList.remove('flash');
    void node.offsetWidth; // restart the animation
    node.classList.add('flash');
  }

  /** JSON.parse with a readable message; {ok, value} or {ok: false, error}. */
  function parseJson(text) {
    if (text.trim() === '') return { ok: false, error: 'empty: a value is required (null is a value)' };
    try { return { ok: true, value: JSON.parse(text) }; }
    catch (e) { return { ok: false, error: e.message }; }
  }

  function showValidation(statusEl, result) {
    statusEl.textContent = result.ok ? '\u2713 valid JSON' : `\u2717 ${result.error}`;
    statusEl.className = `status small ${result.ok ? 'ok' : 'bad'}`;
  }

  // ---------------------------------------------------------------- JSON viewer

  /** A collapsible tree of a JSON value (native <details>; deep or large levels start closed). */
  function jsonNode(v, depth = 0) {
    if (v === null) return el('span', { class: 'j-null', text: 'null' });
    if (typeof v === 'boolean') return el('span', { class: 'j-bool', text: String(v) });
    if (typeof v === 'number') return el('span', { class: 'j-num', text: String(v) });
    if (typeof v === 'string') return el('span', { class: 'j-str', text: JSON.stringify(v) });
    const isArr = Array.isArray(v);
    const entries = isArr ? v.map((x, i) => [i, x]) : Object.entries(v);
    const [open, close] = isArr ? ['[', ']'] : ['{', '}'];
    if (entries.length === 0) return el('span', { class: 'j-punct', text: open + close });
    const label = plural(entries.length, isArr ? 'item' : 'key');
    const det = el('details', { open: depth < 2 && entries.length <= 100 });
    det.append(el('summary', {},
      el('span', { class: 'j-punct', text: open }),
      el('span', { class: 'j-closed muted', text: ` \u2026 ${close} ${label}` })));
    const body = el('div', { class: 'j-body' });
    const shown = entries.slice(0, 1000);
    shown.forEach(([k, x], i) => {
      const row = el('div', { class: 'j-row' });
      if (!isArr) row.append(el('span', { class: 'j-key', text: JSON.stringify(k) }), ': ');
      row.append(jsonNode(x, depth + 1));
      if (i < entries.length - 1) row.append(el('span', { class: 'j-punct', text: ',' }));
      body.append(row);
    });
    if (entries.length > shown.length) body.append(el('div', { class: 'muted', text: `\u2026 ${entries.length - shown.length} more` }));
    det.append(body, el('span', { class: 'j-punct j-end', text: close }));
    return det;
  }

  // ---------------------------------------------------------------- groups (tree)

  async function loadGroups() {
    try {
      const { data } = await api('GET', '/groups');
      const next = new Map();
      for (const g of data.groups) next.set(g.group, g.count);
      if (S.selected !== null && !next.has(S.selected)) next.set(S.selected, 0);
      S.groups = next;
      renderTree();
      updateSelectedCount();
      mark('shardstate:groups-shown');
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) toast(`groups: ${errText(e)}`, 'error');
    }
  }

  function buildTree(names) {
    const root = { children: new Map() };
    for (const name of names) {
      let node = root; let path = '';
      name.split(':').forEach((seg, i) => {
        path = i === 0 ? seg : `${path}:${seg}`;
        let child = node.children.get(seg);
        if (!child) { child = { seg, path, children: new Map(), group: false }; node.children.set(seg, child); }
        node = child;
      });
      node.group = true;
    }
    return root;
  }

  /** Items per namespace path (every proper prefix of a `:`-separated group name), one pass. */
  function namespaceSums() {
    const sums = new Map();
    for (const [g, n] of S.groups) {
      let at = g.indexOf(':');
      while (at !== -1) {
        const path = g.slice(0, at);
        sums.set(path, (sums.get(path) ?? 0) + n);
        at = g.indexOf(':', at + 1);
      }
      sums.set(g, (sums.get(g) ?? 0) + n);
    }
    return sums;
  }

  function summaryText(shown) {
    let total = 0;
    for (const n of S.groups.values()) total += n;
    return shown === null
      ? `${S.groups.size} groups \u00b7 ${total} items`
      : `${shown} of ${S.groups.size} groups`;
  }

  let treeScheduled = false;
  function scheduleTree() {
    if (treeScheduled) return;
    treeScheduled = true;
    requestAnimationFrame(() => { treeScheduled = false; renderTree(); });
  }

  function renderTree() {
    const filter = S.treeFilter.toLowerCase();
    const names = [...S.groups.keys()].filter((g) => !filter || g.toLowerCase().includes(filter)).sort();
    const root = buildTree(names);
    S.countEls = new Map(); S.nsEls = new Map();
    S.nsSums = namespaceSums();
    S.dirty.clear();
    const ul = $('group-tree');
    ul.replaceChildren(...renderChildren(root, filter !== ''));
    $('group-summary').textContent = summaryText(filter ? names.length : null);
  }

  function renderChildren(node, expandAll) {
    const kids = [...node.children.values()].sort((a, b) => (a.seg < b.seg ? -1 : a.seg > b.seg ? 1 : 0));
    return kids.map((child) => renderNode(child, expandAll));
  }

  function renderNode(node, expandAll) {
    const hasKids = node.children.size > 0;
    const collapsed = hasKids && !expandAll && S.collapsed.has(node.path);
    const li = el('li', { class: 'tree-item' });
    const row = el('div', {
      class: `tree-row${node.group ? ' group' : ' ns'}${node.path === S.selected ? ' selected' : ''}`,
      'data-testid': node.group ? 'group-row' : 'tree-node',
      'data-group': node.group ? node.path : null,
      'data-path': node.path,
      title: node.path,
    });
    const toggle = el('button', {
      type: 'button', class: 'toggle', 'data-testid': 'tree-toggle', 'data-path': node.path,
      'aria-expanded': hasKids ? String(!collapsed) : null, tabindex: hasKids ? null : '-1',
      text: hasKids ? (collapsed ? '\u25b8' : '\u25be') : '',
    });
    if (!hasKids) toggle.classList.add('leaf');
    row.append(toggle, el('span', { class: 'label', text: node.seg === '' ? '\u2205' : node.seg }));
    if (node.group) {
      const c = el('span', { class: 'count', 'data-testid': 'group-count', text: String(S.groups.get(node.path) ?? 0) });
      row.append(c);
      S.countEls.set(node.path, c);
    }
    if (hasKids) {
      const agg = el('span', { class: 'count agg', title: 'items in this namespace', text: String(S.nsSums.get(node.path) ?? 0) });
      row.append(agg);
      S.nsEls.set(node.path, agg);
    }
    li.append(row);
    if (hasKids) {
      const sub = el('ul', { class: 'tree' });
      if (collapsed) sub.hidden = true;
      sub.append(...renderChildren(node, expandAll));
      li.append(sub);
    }
    return li;
  }

  /** Counts that events moved, painted once per frame (namespace sums in one pass). */
  function paintCounts() {
    if (S.dirty.size === 0) return;
    for (const group of S.dirty) {
      const c = S.countEls.get(group);
      if (c) { c.textContent = String(S.groups.get(group) ?? 0); flash(c); }
    }
    S.dirty.clear();
    if (S.nsEls.size) {
      S.nsSums = namespaceSums();
      for (const [path, a] of S.nsEls) a.textContent = String(S.nsSums.get(path) ?? 0);
    }
    if (!S.treeFilter) $('group-summary').textContent = summaryText(null);
  }

  /** A live event moved a group's count by delta (+1 created, -1 deleted). */
  function moveCount(group, delta) {
    const prev = S.groups.get(group);
    if (prev === undefined) {
      if (delta > 0) { S.groups.set(group, delta); scheduleTree(); }
    } else {
      const n = Math.max(0, prev + delta);
      if (n === 0 && group !== S.selected) { S.groups.delete(group); scheduleTree(); }
      else { S.groups.set(group, n); S.dirty.add(group); scheduleFlush(); }
    }
    if (group === S.selected) updateSelectedCount();
  }

  function updateSelectedCount() {
    if (S.selected === null) return;
    const n = S.groups.get(S.selected) ?? 0;
    $('group-count').textContent = String(n);
    $('count-word').textContent = n === 1 ? 'item' : 'items';
  }

  function onTreeClick(e) {
    const toggle = e.target.closest('.toggle');
    const row = e.target.closest('.tree-row');
    if (!row) return;
    const path = row.dataset.path;
    if ((toggle && !toggle.classList.contains('leaf')) || !row.dataset.group) {
      if (row.parentElement.querySelector(':scope > ul')) {
        if (S.collapsed.has(path)) S.collapsed.delete(path); else S.collapsed.add(path);
        renderTree();
      }
      return;
    }
    selectGroup(row.dataset.group);
  }

  // ---------------------------------------------------------------- items (pages)

  function selectGroup(group) {
    S.selected = group;
    if (!S.groups.has(group)) S.groups.set(group, 0);
    clearTimeout(S.page.refresh);
    S.page = {
      cursors: [null], index: 0, next: null, limit: Number($('page-size').value), prefix: '',
      seq: S.page.seq + 1, replay: null, refresh: null,
    };
    $('prefix').value = '';
    closePanel();
    document.querySelectorAll('.tree-row.selected').forEach((r) => r.classList.remove('selected'));
    const row = document.querySelector(`.tree-row[data-group="${CSS.escape(group)}"]`);
    if (row) row.classList.add('selected');
    $('no-group').hidden = true;
    $('group-pane').hidden = false;
    $('group-title').textContent = group;
    updateSelectedCount();
    setHash();
    loadPage();
  }

  async function loadPage() {
    const g = S.selected;
    if (g === null) return;
    const p = S.page;
    const seq = ++p.seq;
    const q = new URLSearchParams({ limit: String(p.limit) });
    const cursor = p.cursors[p.index];
    if (cursor) q.set('cursor', cursor);
    if (p.prefix) q.set('prefix', p.prefix);
    p.replay = [];  // events of this group that arrive while the page is on its way
    try {
      const { data } = await api('GET', `/groups/${enc(g)}/items?${q}`);
      if (seq !== S.page.seq || g !== S.selected) return; // a newer request superseded this one
      p.next = data.next_cursor ?? null;
      renderItems(data.items);
      const replay = p.replay;
      p.replay = null;
      for (const [kind, ev] of replay ?? []) applyToRows(kind, ev, false);  // the page may predate them
      mark('shardstate:items-shown');
    } catch (e) {
      if (seq === S.page.seq) { p.replay = null; toast(`items: ${errText(e)}`, 'error'); }
    }
  }

  /** Re-read the page shown, at most once a second (it overflowed or lost rows to live events). */
  function refreshPageSoon() {
    if (S.page.refresh) return;
    S.page.refresh = setTimeout(() => { S.page.refresh = null; loadPage(); }, 1000);
  }

  function renderItems(items) {
    S.rows = new Map();
    S.sortedKeys = items.map((it) => it.key).sort();
    const body = $('items-body');
    body.replaceChildren(...items.map((it) => {
      const tr = itemRow(it);
      S.rows.set(it.key, { item: it, tr });
      return tr;
    }));
    updatePager();
  }

  function itemRow(it) {
    const tr = el('tr', { 'data-testid': 'item-row', 'data-key': it.key, tabindex: '0' });
    fillRow(tr, it);
    if (S.current && S.current.key === it.key) tr.classList.add('selected');
    return tr;
  }

  function fillRow(tr, it) {
    const py = isPython(it.value);
    tr.replaceChildren(
      el('td', { class: 'c-key', 'data-testid': 'item-key' }, el('code', { text: it.key })),
      el('td', { class: `preview${py ? ' python' : ''}`, 'data-testid': 'item-preview', text: preview(it.value) }),
      el('td', { class: 'c-ver', 'data-testid': 'item-version', text: String(it.version) }),
    );
  }

  function updatePager() {
    const p = S.page;
    $('prev-page').disabled = p.index === 0;
    $('next-page').disabled = !p.next && !p.refresh;  // a page that overflowed has more after it
    $('page-label').textContent = `page ${p.index + 1}${p.prefix ? ` \u00b7 prefix \u201c${p.prefix}\u201d` : ''}`;
    $('items-empty').hidden = S.rows.size > 0;
  }

  /** Where ``key`` goes in the page's sorted keys (binary search). */
  function keyIndex(key) {
    const keys = S.sortedKeys;
    let lo = 0; let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (keys[mid] < key) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  /** Whether a new key belongs on the page shown (the pages are in key order). */
  function pageTakes(key) {
    const p = S.page;
    if (p.prefix && !key.startsWith(p.prefix)) return false;
    const keys = S.sortedKeys;
    if (keys.length === 0) return p.index === 0;
    const afterStart = p.index === 0 || key >= keys[0];
    const beforeEnd = !p.next || key <= keys[keys.length - 1];
    return afterStart && beforeEnd;
  }

  /** Put an item on the page (insert in key order, or refresh the row); true if it is shown. */
  function upsertRow(it, highlight) {
    const have = S.rows.get(it.key);
    if (have) {
      if (have.item.version !== undefined && it.version !== undefined && it.version < have.item.version) return true;
      have.item = it;
      fillRow(have.tr, it);
      if (highlight) flash(have.tr);
      return true;
    }
    if (!pageTakes(it.key)) return false;
    const tr = itemRow(it);
    const at = keyIndex(it.key);
    const after = S.sortedKeys[at];
    const body = $('items-body');
    if (after === undefined) body.append(tr); else body.insertBefore(tr, S.rows.get(after).tr);
    S.sortedKeys.splice(at, 0, it.key);
    S.rows.set(it.key, { item: it, tr });
    if (highlight) flash(tr);
    if (S.sortedKeys.length > S.page.limit) {  // a full page: the last row moves to the next page
      removeRow(S.sortedKeys[S.sortedKeys.length - 1]);
      refreshPageSoon();  // for the cursor of the page after it
    }
    updatePager();
    return S.rows.has(it.key);
  }

  /** Take a key off the page (``version``: the deletion's; an older one than the row's is stale). */
  function removeRow(key, version) {
    const have = S.rows.get(key);
    if (!have) return;
    if (version !== undefined && version !== null && have.item.version > version) return;
    have.tr.remove();
    S.rows.delete(key);
    const at = keyIndex(key);
    if (S.sortedKeys[at] === key) S.sortedKeys.splice(at, 1);
    updatePager();
  }

  // ---------------------------------------------------------------- side panel

  async function openItem(key) {
    const g = S.selected;
    try {
      const { data } = await api('GET', itemPath(g, key));
      if (g !== S.selected) return;
      showItem({ key: data.key, value: data.value, version: data.version, gone: false });
      upsertRow({ key: data.key, value: data.value, version: data.version }, false);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { toast(`${key} no longer exists`, 'error'); removeRow(key); }
      else toast(`get: ${errText(e)}`, 'error');
    }
  }

  function showItem(cur) {
    S.current = cur;
    S.editing = false; S.conflict = null;
    $('panel').hidden = false;
    document.querySelectorAll('#items-body tr.selected').forEach((r) => r.classList.remove('selected'));
    const row = S.rows.get(cur.key);
    if (row) row.tr.classList.add('selected');
    $('panel-notice').hidden = true;
    $('conflict').hidden = true;
    renderPanel();
    setHash();
  }

  function renderPanel() {
    const cur = S.current;
    if (!cur) return;
    const py = isPython(cur.value);
    $('panel-key').textContent = cur.key;
    $('panel-version').textContent = String(cur.version);
    $('readonly-note').hidden = !py;
    $('edit').hidden = py || cur.gone;
    $('delete').hidden = py || cur.gone;
    $('copy').hidden = py;
    $('viewer-box').hidden = S.editing;
    $('editor-box').hidden = !S.editing;
    const viewer = $('viewer');
    viewer.replaceChildren(py ? el('pre', { class: 'python', text: cur.value.repr ?? '' }) : jsonNode(cur.value));
  }

  function notice(text) {
    const n = $('panel-notice');
    n.textContent = text;
    n.hidden = false;
  }

  function closePanel() {
    S.current = null; S.editing = false; S.conflict = null;
    $('panel').hidden = true;
    document.querySelectorAll('#items-body tr.selected').forEach((r) => r.classList.remove('selected'));
    setHash();
  }

  function startEdit() {
    const cur = S.current;
    if (!cur || isPython(cur.value)) return;
    S.editing = true;
    S.editBase = cur.version;
    S.conflict = null;
    $('conflict').hidden = true;
    $('panel-notice').hidden = true;
    $('editor').value = JSON.stringify(cur.value, null, 2);
    validateEditor();
    renderPanel();
    $('editor').focus();
  }

  function validateEditor() {
    const r = parseJson($('editor').value);
    showValidation($('editor-status'), r);
    $('save').disabled = !r.ok;
    return r;
  }

  function cancelEdit() {
    S.editing = false; S.conflict = null;
    $('conflict').hidden = true;
    renderPanel();
  }

  /** PUT the editor's text (sent as typed, so large numbers keep their digits). */
  async function putValue(headers) {
    const r = validateEditor();
    if (!r.ok) return;
    const cur = S.current;
    const g = S.selected;
    $('save').disabled = true;
    try {
      const { data } = await api('PUT', itemPath(g, cur.key), { raw: $('editor').value, headers });
      if (g !== S.selected || !S.current || S.current.key !== cur.key) return;
      S.current = { key: cur.key, value: data.new_value, version: data.version, gone: false };
      S.editing = false; S.conflict = null;
      $('conflict').hidden = true;
      $('panel-notice').hidden = true;
      renderPanel();
      upsertRow({ key: cur.key, value: data.new_value, version: data.version }, true);
      toast(`saved ${cur.key} (version ${data.version})`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 412) await showConflict();
      else toast(`save: ${errText(e)}`, 'error');
    } finally {
      if (S.editing) validateEditor();
    }
  }

  function save() {
    if (!S.current) return;
    return putValue({ 'If-Match': `"${S.editBase}"` });
  }

  /** The value changed underneath an open edit: show what is stored now; the edit stays in the editor. */
  async function showConflict() {
    const cur = S.current;
    const g = S.selected;
    try {
      const { data } = await api('GET', itemPath(g, cur.key));
      S.conflict = { value: data.value, version: data.version };
      $('conflict-text').textContent = `another client changed this item (your edit started from version `
        + `${S.editBase}; it is now version ${data.version}). Nothing was saved. Current value:`;
      $('conflict-current').textContent = isPython(data.value) ? data.value.repr : JSON.stringify(data.value, null, 2);
      $('conflict-overwrite').textContent = 'Overwrite with my edit';
      $('conflict-overwrite').hidden = isPython(data.value);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) { toast(`get: ${errText(e)}`, 'error'); return; }
      S.conflict = { gone: true };
      $('conflict-text').textContent = 'another client deleted this item meanwhile. Nothing was saved.';
      $('conflict-current').textContent = '';
      $('conflict-overwrite').textContent = 'Re-create with my edit';
      $('conflict-overwrite').hidden = false;
    }
    $('conflict').hidden = false;
  }

  function conflictReload() {
    const c = S.conflict;
    if (!c) return;
    $('conflict').hidden = true;
    if (c.gone) {
      S.current = { ...S.current, gone: true };
      S.editing = false; S.conflict = null;
      notice('This item was deleted by another client.');
      renderPanel();
      return;
    }
    showItem({ key: S.current.key, value: c.value, version: c.version, gone: false });
  }

  function conflictOverwrite() {
    const c = S.conflict;
    if (!c) return;
    // Still a compare-and-set: against the version just shown, so a third writer is not overwritten blindly.
    S.editBase = c.version;
    return putValue(c.gone ? { 'If-None-Match': '*' } : { 'If-Match': `"${c.version}"` });
  }

  // ---------------------------------------------------------------- add / delete / clear

  function openAdd() {
    if (S.selected === null) return;
    $('add-group').textContent = S.selected;
    $('add-key').value = '';
    $('add-value').value = '{}';
    $('add-status').textContent = '';
    validateAdd();
    $('add-dialog').showModal();
    $('add-key').focus();
  }

  function validateAdd() {
    const r = parseJson($('add-value').value);
    showValidation($('add-status'), r);
    $('add-create').disabled = !r.ok || $('add-key').value === '';
    return r;
  }

  async function createItem(e) {
    e.preventDefault();
    const r = validateAdd();
    const key = $('add-key').value;
    if (!r.ok || key === '') return;
    const g = S.selected;
    try {
      const { data } = await api('PUT', itemPath(g, key), { raw: $('add-value').value, headers: { 'If-None-Match': '*' } });
      $('add-dialog').close();
      const it = { key, value: data.new_value, version: data.version };
      upsertRow(it, true);
      showItem({ ...it, gone: false });
      toast(`created ${key}`);
    } catch (err) {
      const st = $('add-status');
      st.className = 'status small bad';
      st.textContent = err instanceof ApiError && err.status === 412
        ? `\u2717 the key ${key} already exists in ${g}`
        : `\u2717 ${errText(err)}`;
    }
  }

  function openDelete() {
    const cur = S.current;
    if (!cur || isPython(cur.value)) return;
    S.deleteForce = false;
    $('delete-key').textContent = cur.key;
    $('delete-group').textContent = S.selected;
    $('delete-status').textContent = '';
    $('delete-confirm').textContent = 'Delete';
    $('delete-dialog').showModal();
  }

  async function confirmDelete() {
    const cur = S.current;
    const g = S.selected;
    if (!cur) { $('delete-dialog').close(); return; }
    const headers = S.deleteForce ? {} : { 'If-Match': `"${cur.version}"` };
    try {
      await api('DELETE', itemPath(g, cur.key), { headers });
      $('delete-dialog').close();
      removeRow(cur.key);
      closePanel();
      toast(`deleted ${cur.key}`);
    } catch (e) {
      const st = $('delete-status');
      st.className = 'status small bad';
      if (e instanceof ApiError && e.status === 412) {
        S.deleteForce = true;
        st.textContent = 'Another client changed this item since you opened it. Press "Delete anyway" to delete it regardless.';
        $('delete-confirm').textContent = 'Delete anyway';
      } else if (e instanceof ApiError && e.status === 404) {
        $('delete-dialog').close();
        removeRow(cur.key);
        closePanel();
        toast(`${cur.key} was already deleted`);
      } else {
        st.textContent = errText(e);
      }
    }
  }

  function openClear() {
    if (S.selected === null) return;
    $('clear-group-name').textContent = S.selected;
    $('clear-count').textContent = String(S.groups.get(S.selected) ?? 0);
    $('clear-input').value = '';
    $('clear-status').textContent = '';
    $('clear-confirm').disabled = true;
    $('clear-dialog').showModal();
    $('clear-input').focus();
  }

  async function confirmClear() {
    const g = S.selected;
    if ($('clear-input').value !== g) return;
    try {
      const { data } = await api('DELETE', `/groups/${enc(g)}`);
      $('clear-dialog').close();
      closePanel();
      S.page = { ...S.page, cursors: [null], index: 0, next: null };
      renderItems([]);
      toast(`cleared ${g}: ${data.removed} items removed`);
      loadPage();
    } catch (e) {
      $('clear-status').className = 'status small bad';
      $('clear-status').textContent = errText(e);
    }
  }

  // ---------------------------------------------------------------- live events

  function remember(id) {
    if (!id) return true;
    if (S.seen.has(id)) return false;
    S.seen.add(id); S.seenOrder.push(id);
    if (S.seenOrder.length > 5000) S.seen.delete(S.seenOrder.shift());
    return true;
  }

  function connectEvents() {
    if (S.es) S.es.close();
    const es = new EventSource(`${API}/events`, { withCredentials: true });
    S.es = es;
    const live = $('live');
    es.onopen = () => {
      live.textContent = 'live'; live.className = 'live on';
      if (S.esOpened) setTimeout(() => { loadGroups(); loadPage(); }, 1500); // catch up after a gap
      S.esOpened = true;
    };
    es.onerror = () => {
      live.textContent = 'reconnecting\u2026'; live.className = 'live off';
      if (es.readyState === EventSource.CLOSED) {  // refused (not a dropped line): a 401 asks for the token
        loadGroups();
        setTimeout(connectEvents, 3000);
      }
    };
    const handler = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (_) { return; }
      if (!remember(m.lastEventId)) return;
      onStateEvent(ev, m.lastEventId);
    };
    es.addEventListener('state', handler);
    es.onmessage = handler;
  }

  function onStateEvent(ev, id) {
    const group = ev.scope ?? ev.group_id;
    const kind = String(ev.event_type || '').replace(/^state:/, '');
    if (typeof group !== 'string' || typeof ev.key !== 'string') return;
    if (kind === 'created') moveCount(group, +1);
    else if (kind === 'deleted') moveCount(group, -1);
    else if (!S.groups.has(group)) { S.groups.set(group, 1); scheduleTree(); reconcileSoon(); }
    if (group === S.selected) applyToItems(kind, ev);
    S.incoming.push({ id, at: new Date(), kind, group, key: ev.key, version: ev.version, value: ev.new_value });
    if (S.incoming.length > MAX_EVENTS) S.incoming.splice(0, S.incoming.length - MAX_EVENTS);
    scheduleFlush();
  }

  // Events arrive one by one; the DOM work they cause (counts, events panel) is done once per frame.
  let flushScheduled = false;
  function scheduleFlush() {
    if (flushScheduled) return;
    flushScheduled = true;
    requestAnimationFrame(() => {
      flushScheduled = false;
      paintCounts();
      if (S.incoming.length) { const recs = S.incoming.reverse(); S.incoming = []; recordEvents(recs); }
    });
  }

  const reconcileSoon = debounce(loadGroups, 2000);

  /** A live event of the selected group on its rows (also replayed over a page that predates it). */
  function applyToRows(kind, ev, highlight) {
    if (kind === 'deleted') {
      const shown = S.rows.has(ev.key);
      removeRow(ev.key, ev.version);
      if (shown && S.page.next) refreshPageSoon();  // pull the next key up into the page
    } else {
      upsertRow({ key: ev.key, value: ev.new_value, version: ev.version }, highlight);
    }
  }

  function applyToItems(kind, ev) {
    const key = ev.key;
    const replay = S.page.replay;
    if (replay) {
      replay.push([kind, ev]);
      if (replay.length > 5000) { S.page.replay = null; refreshPageSoon(); }  // too many: read it again
    }
    applyToRows(kind, ev, true);
    const cur = S.current;
    if (!cur || cur.key !== key) return;
    if (ev.version !== undefined && ev.version !== null && ev.version <= cur.version && kind !== 'deleted') return;
    if (kind === 'deleted') {
      if (S.editing) notice('Another client deleted this item; saving will show a conflict.');
      else { S.current = { ...cur, gone: true }; notice('This item was deleted by another client.'); renderPanel(); }
      return;
    }
    if (S.editing) {
      notice(`Another client changed this item (now version ${ev.version}); saving will show a conflict.`);
    } else {
      S.current = { key, value: ev.new_value, version: ev.version, gone: false };
      renderPanel();
      notice(`Updated live by another client (version ${ev.version}).`);
    }
  }

  // ---------------------------------------------------------------- events panel

  function recordEvents(recs) {  // newest first
    const E = S.ev;
    if (E.paused) {
      E.pending = recs.concat(E.pending);
      if (E.pending.length > MAX_EVENTS) E.pending.length = MAX_EVENTS;
      updateEventsInfo();
      return;
    }
    pushEvents(recs);
  }

  function pushEvents(recs) {   // recs newest first
    const E = S.ev;
    E.list = recs.concat(E.list);
    if (E.list.length > MAX_EVENTS) E.list.length = MAX_EVENTS;
    const body = $('events-body');
    const rows = recs.slice(0, MAX_EVENTS).filter(eventMatches).map(eventRow);
    body.prepend(...rows);
    while (body.children.length > MAX_EVENTS) body.lastElementChild.remove();
    if (S.tab !== 'events') {
      E.unread += recs.length;
      const b = $('events-badge');
      b.textContent = E.unread > 999 ? '999+' : String(E.unread);
      b.hidden = false;
    }
    updateEventsInfo();
  }

  function eventMatches(rec) {
    const f = S.ev.filter.toLowerCase();
    return !f || rec.group.toLowerCase().includes(f) || rec.key.toLowerCase().includes(f);
  }

  function eventRow(rec) {
    const time = rec.at.toLocaleTimeString(undefined, { hour12: false }) + `.${String(rec.at.getMilliseconds()).padStart(3, '0')}`;
    return el('tr', { 'data-testid': 'event-row', 'data-group': rec.group, 'data-key': rec.key, class: `ev-${rec.kind}` },
      el('td', { class: 'c-time muted', text: time }),
      el('td', { class: 'c-type' }, el('span', { class: `tag ${rec.kind}`, text: rec.kind })),
      el('td', { text: rec.group }),
      el('td', {}, el('code', { text: rec.key })),
      el('td', { class: 'c-ver', text: rec.version === undefined ? '' : String(rec.version) }),
      el('td', { class: 'preview', text: rec.kind === 'deleted' ? '\u2014' : preview(rec.value) }));
  }

  function renderEvents() {
    $('events-body').replaceChildren(...S.ev.list.filter(eventMatches).map(eventRow));
    updateEventsInfo();
  }

  function updateEventsInfo() {
    const E = S.ev;
    let t = `${E.list.length} events (newest first, last ${MAX_EVENTS} kept)`;
    if (E.paused) t = `paused \u00b7 ${E.pending.length} new while paused \u00b7 ${t}`;
    $('events-info').textContent = t;
  }

  function togglePause() {
    const E = S.ev;
    E.paused = !E.paused;
    $('events-pause').textContent = E.paused ? 'Resume' : 'Pause';
    $('events-pause').classList.toggle('primary', E.paused);
    if (!E.paused && E.pending.length) { const p = E.pending; E.pending = []; pushEvents(p); }
    updateEventsInfo();
  }

  // ---------------------------------------------------------------- cluster panel

  const fmt = (x, d = 1) => (typeof x === 'number' ? (Number.isInteger(x) ? String(x) : x.toFixed(d)) : (x ?? '\u2014'));

  async function loadCluster() {
    try {
      const { data } = await api('GET', '/cluster');
      renderCluster(data);
    } catch (e) {
      $('cluster-updated').textContent = `could not refresh: ${errText(e)}`;
    }
  }

  function card(label, value, testid) {
    return el('div', { class: 'card' }, el('div', { class: 'muted small', text: label }),
      el('div', { class: 'big', 'data-testid': testid, text: String(value) }));
  }

  function renderCluster(c) {
    $('cluster-name').textContent = c.cluster ? `cluster ${c.cluster}` : '';
    const nodes = c.nodes || [];
    const lag = c.trigger_lag || {};
    const dead = c.dead_letters || [];
    $('cluster-totals').replaceChildren(
      card('Cluster', c.cluster ?? '', 'total-cluster'),
      card('Shards', (c.shards || []).length, 'total-shards'),
      card('Nodes alive', `${nodes.filter((n) => n.alive).length} / ${nodes.length}`, 'total-nodes'),
      card('Keys', c.keys ?? 0, 'total-keys'),
      card('Ops/s', fmt(c.ops_per_s), 'total-ops'),
      card('Trigger lag', `${lag.events ?? 0} events \u00b7 ${fmt(lag.seconds ?? 0, 2)} s`, 'trigger-lag'),
      card('Dead letters', dead.length, 'total-dead'));
    $('shards-body').replaceChildren(...(c.shards || []).map((s) => el('tr', { 'data-testid': 'shard-row' },
      el('td', { text: String(s.index) }), el('td', {}, el('code', { text: short(s.node) })),
      el('td', {}, el('span', { class: `tag ${s.role}`, text: String(s.role ?? '') })),
      el('td', { text: fmt(s.epoch) }), el('td', { text: fmt(s.keys) }), el('td', { text: fmt(s.groups) }),
      el('td', { text: fmt(s.ops_per_s) }),
      el('td', {}, metricsCell(s.metrics)))));
    $('nodes-body').replaceChildren(...nodes.map((n) => el('tr', { 'data-testid': 'node-row' },
      el('td', {}, el('code', { text: short(n.node_id) })), el('td', { text: n.address ?? '' }),
      el('td', {}, el('span', { class: `tag ${n.alive ? 'ok' : 'bad'}`, text: n.alive ? 'alive' : 'dead' })))));
    $('triggers-body').replaceChildren(...(c.triggers || []).map((t) => el('tr', { 'data-testid': 'trigger-row' },
      el('td', { text: t.name }), el('td', { text: t.group_id ?? '*' }), el('td', { text: t.key ?? '*' }),
      el('td', {}, el('code', { text: t.handler ?? '' })))));
    if (!(c.triggers || []).length) $('triggers-body').append(emptyRow(4, 'No triggers.'));
    $('dead-body').replaceChildren(...dead.map((d) => {
      const btn = el('button', { type: 'button', 'data-testid': 'retry', text: 'Retry' });
      btn.addEventListener('click', () => retryDead(d, btn));
      return el('tr', { 'data-testid': 'dead-row', 'data-event-id': d.event_id },
        el('td', { text: d.trigger }), el('td', { text: d.group_id }), el('td', {}, el('code', { text: d.key })),
        el('td', { class: 'error-text', text: d.error }), el('td', { text: fmt(d.attempts) }),
        el('td', { text: typeof d.at === 'number' ? new Date(d.at * 1000).toLocaleString() : String(d.at ?? '') }),
        el('td', {}, btn));
    }));
    if (!dead.length) $('dead-body').append(emptyRow(7, 'No dead letters.'));
    $('cluster-updated').textContent = `updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
  }

  const short = (id) => (typeof id === 'string' && id.length > 16 ? `${id.slice(0, 12)}\u2026` : String(id ?? ''));
  const emptyRow = (n, text) => el('tr', {}, el('td', { colspan: String(n), class: 'muted', text }));

  function metricsCell(m) {
    if (!m || typeof m !== 'object' || !Object.keys(m).length) return '';
    const det = el('details', {}, el('summary', { class: 'muted', text: plural(Object.keys(m).length, 'figure') }));
    det.append(jsonNode(m, 1));
    return det;
  }

  async function retryDead(d, btn) {
    btn.disabled = true;
    try {
      const { data } = await api('POST', '/dead-letters/retry', { body: { trigger: d.trigger, event_id: d.event_id } });
      toast(data.retried ? `retried ${d.trigger} for ${d.key}` : 'that dead letter is gone already', data.retried ? 'info' : 'error');
    } catch (e) {
      toast(`retry: ${errText(e)}`, 'error');
    }
    loadCluster();
  }

  function clusterPolling() {
    const want = S.tab === 'cluster' && document.visibilityState === 'visible';
    if (want && S.clusterTimer === null) {
      loadCluster();
      S.clusterTimer = setInterval(loadCluster, CLUSTER_POLL_MS);
    } else if (!want && S.clusterTimer !== null) {
      clearInterval(S.clusterTimer);
      S.clusterTimer = null;
    }
  }

  // ---------------------------------------------------------------- tabs, login, location

  function showTab(tab) {
    S.tab = tab;
    for (const b of document.querySelectorAll('.tab')) b.classList.toggle('active', b.dataset.tab === tab);
    for (const name of ['data', 'events', 'cluster']) $(`view-${name}`).hidden = name !== tab;
    if (tab === 'events') { S.ev.unread = 0; $('events-badge').hidden = true; }
    clusterPolling();
    setHash();
  }

  function showLogin() {
    const d = $('login-dialog');
    if (!d.open) d.showModal();
  }

  function setHash() {
    const q = new URLSearchParams();
    if (S.tab !== 'data') q.set('tab', S.tab);
    if (S.selected !== null) q.set('g', S.selected);
    if (S.current) q.set('k', S.current.key);
    const h = q.toString();
    history.replaceState(null, '', h ? `#${h}` : location.pathname);
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    $('group-tree').addEventListener('click', onTreeClick);
    $('group-filter').addEventListener('input', debounce((e) => { S.treeFilter = e.target.value.trim(); renderTree(); }, 120));
    $('items-body').addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-key]');
      if (tr) openItem(tr.dataset.key);
    });
    $('items-body').addEventListener('keydown', (e) => {
      const tr = e.target.closest('tr[data-key]');
      if (tr && e.key === 'Enter') openItem(tr.dataset.key);
    });
    $('prefix').addEventListener('input', debounce((e) => {
      S.page = { ...S.page, cursors: [null], index: 0, next: null, prefix: e.target.value };
      loadPage();
    }, 250));
    $('page-size').addEventListener('change', (e) => {
      S.page = { ...S.page, cursors: [null], index: 0, next: null, limit: Number(e.target.value) };
      loadPage();
    });
    $('next-page').addEventListener('click', async () => {
      const p = S.page;
      if (p.refresh) {  // live inserts pushed rows off this page: its next cursor is out of date
        clearTimeout(p.refresh);
        p.refresh = null;
        await loadPage();
      }
      if (!p.next || p !== S.page) return;
      p.cursors = p.cursors.slice(0, p.index + 1).concat([p.next]);
      p.index += 1;
      loadPage();
    });
    $('prev-page').addEventListener('click', () => {
      const p = S.page;
      if (p.index === 0) return;
      p.index -= 1;
      p.cursors = p.cursors.slice(0, p.index + 1);
      loadPage();
    });
    $('add-item').addEventListener('click', openAdd);
    $('clear-group').addEventListener('click', openClear);
    $('panel-close').addEventListener('click', closePanel);
    $('edit').addEventListener('click', startEdit);
    $('delete').addEventListener('click', openDelete);
    $('copy').addEventListener('click', async () => {
      try { await navigator.clipboard.writeText(JSON.stringify(S.current.value, null, 2)); toast('copied'); }
      catch (_) { toast('the browser did not allow copying', 'error'); }
    });
    $('editor').addEventListener('input', validateEditor);
    $('editor').addEventListener('keydown', (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === 'Enter' && !$('save').disabled) save();
    });
    $('save').addEventListener('click', save);
    $('format').addEventListener('click', () => {
      const r = validateEditor();
      if (r.ok) $('editor').value = JSON.stringify(r.value, null, 2);
    });
    $('cancel-edit').addEventListener('click', cancelEdit);
    $('conflict-reload').addEventListener('click', conflictReload);
    $('conflict-overwrite').addEventListener('click', conflictOverwrite);
    $('add-form').addEventListener('submit', createItem);
    $('add-key').addEventListener('input', validateAdd);
    $('add-value').addEventListener('input', validateAdd);
    $('add-cancel').addEventListener('click', () => $('add-dialog').close());
    $('delete-cancel').addEventListener('click', () => $('delete-dialog').close());
    $('delete-confirm').addEventListener('click', confirmDelete);
    $('clear-cancel').addEventListener('click', () => $('clear-dialog').close());
    $('clear-input').addEventListener('input', () => { $('clear-confirm').disabled = $('clear-input').value !== S.selected; });
    $('clear-input').addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); confirmClear(); } });
    $('clear-confirm').addEventListener('click', confirmClear);
    $('login-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const t = $('login-token').value.trim();
      if (t) location.href = `/?token=${enc(t)}`;
    });
    $('events-pause').addEventListener('click', togglePause);
    $('events-clear').addEventListener('click', () => { S.ev.list = []; S.ev.pending = []; renderEvents(); });
    $('events-filter').addEventListener('input', debounce((e) => { S.ev.filter = e.target.value.trim(); renderEvents(); }, 120));
    for (const b of document.querySelectorAll('.tab')) b.addEventListener('click', () => showTab(b.dataset.tab));
    document.addEventListener('visibilitychange', clusterPolling);
    window.addEventListener('hashchange', followLocation);  // a link or an edited address bar
  }

  /** Show what the location names: ``#g=<group>&k=<key>&tab=<events|cluster>``. */
  function followLocation() {
    const h = new URLSearchParams(location.hash.slice(1));
    const g = h.get('g');
    if (g !== null && g !== S.selected) selectGroup(g);
    if (g !== null && h.get('k') !== null && (!S.current || S.current.key !== h.get('k'))) openItem(h.get('k'));
    showTab(['events', 'cluster'].includes(h.get('tab')) ? h.get('tab') : 'data');
  }

  async function start() {
    wire();
    connectEvents();
    const groups = loadGroups();
    followLocation();  // a group named in the location loads its first page meanwhile
    await groups;
    setInterval(loadGroups, RECONCILE_MS);
    api('GET', '/cluster').then(({ data }) => {
      $('cluster-name').textContent = data.cluster ? `cluster ${data.cluster}` : '';
    }).catch(() => {});
    updateEventsInfo();
    document.body.dataset.ready = '1';
  }

  document.addEventListener('DOMContentLoaded', start);
})();
