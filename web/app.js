// blipsearch web UI: plain JavaScript, no build step, no dependencies. Talks only to the JSON API
// described in the repository's API contract (GET /api/search, POST /api/search/image, ...).
'use strict';

(() => {
  const KEY_STORAGE = 'blipsearch.apiKey';
  const DEFAULT_LIMIT = 20;
  const DEFAULT_RERANK_K = 16;
  // Facets the server counts per search (its limit), and the attribute types shown as
  // checkboxes (counted) or as a from-to range.
  const MAX_FACETS = 16;
  const CHECKBOX_KINDS = ['keyword', 'bool'];
  const RANGE_KINDS = ['number', 'date'];
  const POLL_ACTIVE_MS = 1500;
  const POLL_IDLE_MS = 15000;
  // Moderation: the views, review items per page, audit events per page, and the defaults the
  // server matches with (shown beside a match's figures).
  const MOD_VIEWS = ['review', 'lists', 'audit'];
  const REVIEW_PAGE = 10;
  const AUDIT_PAGE = 50;
  const PDQ_BITS = 256;
  const DEFAULT_PDQ_DISTANCE = 31;
  const DEFAULT_MIN_COSINE = 0.92;

  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  };

  const ui = {
    form: $('#search-form'),
    q: $('#q'),
    mode: $('#mode'),
    rerank: $('#rerank'),
    limit: $('#limit'),
    folder: $('#folder'),
    folderList: $('#folder-list'),
    dateFrom: $('#date-from'),
    dateTo: $('#date-to'),
    clearFilters: $('#clear-filters'),
    group: $('#group'),
    groupField: $('#group-field'),
    facets: $('#facets'),
    imageInput: $('#image-search-input'),
    results: $('#results'),
    summary: $('#summary'),
    notices: $('#notices'),
    loadMore: $('#load-more'),
    empty: $('#empty'),
    emptyTitle: $('#empty-title'),
    emptyText: $('#empty-text'),
    emptyActions: $('#empty-actions'),
    error: $('#error'),
    errorTitle: $('#error-title'),
    errorMessage: $('#error-message'),
    ingest: $('#ingest'),
    ingestText: $('#ingest-text'),
    ingestProgress: $('#ingest-progress'),
    ingestRefresh: $('#ingest-refresh'),
    footerStats: $('#footer-stats'),
    dropzone: $('#dropzone'),
    detail: $('#detail'),
    upload: $('#upload'),
    key: $('#key'),
    toast: $('#toast'),
    flagged: $('#flagged'),
    flaggedField: $('#flagged-field'),
    searchView: $('#search-view'),
    reviewOpen: $('#review-open'),
    reviewCount: $('#review-count'),
    moderation: $('#moderation'),
  };

  const state = {
    key: readKey(),
    protectReads: false,
    status: null,
    ingestWasActive: false,
    query: null, // {kind: 'text', q} | {kind: 'like', id, name} | {kind: 'file', file}
    hits: [],
    offset: 0,
    hasMore: false,
    seq: 0,
    blobUrls: [],
    queryBlobUrl: null,
    detailIndex: -1,
    detailHit: null,
    focusIndex: 0,
    // Product attributes of the collection (name -> type, from /api/status): what facets and
    // filters exist. Empty for a folder collection, which then shows none.
    schema: {},
    schemaLoaded: false,
    // Checked facet values by attribute, and from-to ranges by attribute (strings as typed).
    picked: new Map(),
    ranges: new Map(),
    // `filter` strings of the page URL, read once the schema is known.
    urlFilters: [],
    total: null,
    // The moderation view shown instead of the search results: 'review', 'lists' or 'audit'.
    view: null,
    // Match lists (from /api/lists, with the key), for the flagged filter and the review queue.
    lists: [],
    review: { list: '', offset: 0, total: 0, seq: 0 },
    // Audit events shown, newest first, and the oldest one's `seq` (for "older events").
    audit: { oldest: 0, seq: 0 },
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function readKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ''; } catch { return ''; }
  }

  function writeKey(key) {
    state.key = key;
    try {
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: keep the key for this page only */ }
  }

  function authHeaders() {
    return state.key ? { Authorization: `Bearer ${state.key}` } : {};
  }

  async function readError(res) {
    let code = `http_${res.status}`;
    let message = res.statusText || 'Request failed';
    try {
      const body = await res.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch { /* not JSON: keep the status line */ }
    return new ApiError(res.status, code, message);
  }

  /** Calls the API; on 401 asks for a key once and retries. Throws ApiError. */
  async function api(path, { method = 'GET', body, json, retry = true } = {}) {
    const headers = { Accept: 'application/json', ...authHeaders() };
    let payload = body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(json);
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body: payload });
    } catch {
      throw new ApiError(0, 'network', 'Cannot reach the server. Is blipsearch still running?');
    }
    if (res.status === 401) {
      const err = await readError(res);
      if (method === 'GET') state.protectReads = true;
      if (retry && await askKey(err.message)) return api(path, { method, body, json, retry: false });
      throw err;
    }
    if (!res.ok) throw await readError(res);
    const type = res.headers.get('content-type') || '';
    return type.includes('json') ? res.json() : res.text();
  }

  /** Shows `url` in `img`, through an authorised fetch when reads need the key. */
  function loadImage(img, url) {
    if (!url) return;
    if (!(state.protectReads && state.key)) {
      img.src = url;
      return;
    }
    fetch(url, { headers: authHeaders() })
      .then((res) => (res.ok ? res.blob() : Promise.reject(new Error(res.statusText))))
      .then((blob) => {
        const obj = URL.createObjectURL(blob);
        state.blobUrls.push(obj);
        img.src = obj;
      })
      .catch(() => img.dispatchEvent(new Event('error')));
  }

  function releaseBlobs() {
    for (const u of state.blobUrls) URL.revokeObjectURL(u);
    state.blobUrls = [];
  }

  // ---------------------------------------------------------------- messages

  function showError(err, title = 'Something went wrong.') {
    const e = err instanceof ApiError ? err : new ApiError(0, 'client', String(err && err.message || err));
    ui.errorTitle.textContent = e.status === 401 ? 'Not authorised.' : title;
    ui.errorMessage.textContent = e.code && e.status ? `${e.message} (${e.code}, HTTP ${e.status})` : e.message;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
  }

  let toastTimer = 0;
  function toast(text) {
    ui.toast.textContent = text;
    ui.toast.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { ui.toast.hidden = true; }, 4000);
  }

  // ---------------------------------------------------------------- formatting

  const fmt = {
    num: (v, digits = 3) => (typeof v === 'number' && Number.isFinite(v) ? v.toFixed(digits) : '—'),
    pct: (v) => (typeof v === 'number' && Number.isFinite(v) ? `${Math.round(v * 100)}%` : '—'),
    rank: (v) => (typeof v === 'number' ? `#${v}` : '—'),
    bytes: (n) => {
      if (typeof n !== 'number') return '—';
      const units = ['B', 'KB', 'MB', 'GB'];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
      return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
    },
    date: (unix) => (typeof unix === 'number' ? new Date(unix * 1000).toLocaleString() : '—'),
    count: (n) => (typeof n === 'number' ? n.toLocaleString() : '—'),
  };

  function bestCaption(hit) {
    if (hit.matched_caption) return hit.matched_caption;
    const caps = hit.captions || [];
    const kept = caps.find((c) => c.kept) || caps[0];
    if (kept) return kept.text;
    return (hit.product && hit.product.title) || '';
  }

  // ---------------------------------------------------------------- search parameters and URL

  function filterParams(params) {
    const folder = ui.folder.value.trim();
    if (folder) params.set('folder', folder);
    if (ui.dateFrom.value) params.set('date_from', ui.dateFrom.value);
    if (ui.dateTo.value) params.set('date_to', ui.dateTo.value);
    if (ui.flagged.value) params.set('flagged', ui.flagged.value);
    return params;
  }

  function hasFilters() {
    return Boolean(ui.folder.value.trim() || ui.dateFrom.value || ui.dateTo.value || ui.flagged.value || productFilters().length);
  }

  // ---------------------------------------------------------------- product attributes

  function attributesOf(kinds) {
    return Object.entries(state.schema).filter(([, t]) => kinds.includes(t)).map(([n]) => n);
  }

  function hasProducts() {
    return Object.keys(state.schema).length > 0;
  }

  function grouped() {
    return hasProducts() && ui.group.checked;
  }

  /** A keyword as a filter value: `|`, `*` and `\` stand for themselves when escaped. */
  const escapeValue = (v) => v.replace(/[\\|*]/g, (c) => `\\${c}`);

  /** `value` split at unescaped `|`, each part unescaped. */
  function splitAlternatives(value) {
    const parts = [];
    let cur = '';
    for (let i = 0; i < value.length; i += 1) {
      const c = value[i];
      if (c === '\\' && i + 1 < value.length) { i += 1; cur += value[i]; } else if (c === '|') { parts.push(cur); cur = ''; } else cur += c;
    }
    parts.push(cur);
    return parts;
  }

  /** The `filter` parameters of the checked values and ranges, but those of `except`. */
  function productFilters(except) {
    const out = [];
    for (const [name, values] of state.picked) {
      if (name !== except && values.size) out.push(`${name}:${[...values].map(escapeValue).join('|')}`);
    }
    for (const [name, r] of state.ranges) {
      if (name !== except && (r.min || r.max)) out.push(`${name}:${r.min}..${r.max}`);
    }
    return out;
  }

  /** Checked values and ranges from the page URL's `filter`s, with the types of the schema. */
  function applyUrlFilters() {
    state.picked = new Map();
    state.ranges = new Map();
    for (const f of state.urlFilters) {
      const at = f.indexOf(':');
      const name = f.slice(0, at);
      const value = f.slice(at + 1);
      const type = state.schema[name];
      if (at < 0 || !type) continue;
      if (RANGE_KINDS.includes(type)) {
        const [min = '', max = ''] = value.includes('..') ? value.split('..') : [value, value];
        state.ranges.set(name, { min, max });
      } else {
        state.picked.set(name, new Set(splitAlternatives(value)));
      }
    }
  }

  function limit() {
    return Number(ui.limit.value) || DEFAULT_LIMIT;
  }

  /** Page URL for the current query, so that a search can be shared or reloaded. */
  function pageUrl() {
    const p = new URLSearchParams();
    const query = state.query;
    if (query && query.kind === 'text') p.set('q', query.q);
    if (query && query.kind === 'like') p.set('like', String(query.id));
    if (ui.mode.value !== 'hybrid') p.set('mode', ui.mode.value);
    if (!ui.rerank.checked) p.set('rerank', '0');
    if (limit() !== DEFAULT_LIMIT) p.set('limit', String(limit()));
    if (ui.folder.value.trim()) p.set('folder', ui.folder.value.trim());
    if (ui.dateFrom.value) p.set('from', ui.dateFrom.value);
    if (ui.dateTo.value) p.set('to', ui.dateTo.value);
    if (ui.flagged.value) p.set('flagged', ui.flagged.value);
    for (const f of productFilters()) p.append('filter', f);
    if (grouped()) p.set('group', '1');
    const s = p.toString();
    return s ? `?${s}` : location.pathname;
  }

  function applyUrl() {
    const p = new URLSearchParams(location.search);
    ui.q.value = p.get('q') || '';
    const mode = p.get('mode');
    ui.mode.value = ['hybrid', 'vector', 'text'].includes(mode) ? mode : 'hybrid';
    ui.rerank.checked = p.get('rerank') !== '0';
    const lim = p.get('limit');
    ui.limit.value = [...ui.limit.options].some((o) => o.value === lim) ? lim : String(DEFAULT_LIMIT);
    ui.folder.value = p.get('folder') || '';
    ui.dateFrom.value = p.get('from') || '';
    ui.dateTo.value = p.get('to') || '';
    setFlagged(p.get('flagged') || '');
    const view = p.get('view');
    state.view = MOD_VIEWS.includes(view) ? view : null;
    if (state.view === 'review') state.review.list = p.get('list') || '';
    ui.group.checked = p.get('group') === '1';
    state.urlFilters = p.getAll('filter');
    if (state.schemaLoaded) applyUrlFilters();
    updateFilterButton();
    const like = Number(p.get('like'));
    if (p.get('q')) return { kind: 'text', q: p.get('q') };
    if (Number.isInteger(like) && like >= 0 && p.has('like')) return { kind: 'like', id: like };
    return null;
  }

  function updateFilterButton() {
    ui.clearFilters.hidden = !hasFilters();
  }

  // ---------------------------------------------------------------- searching

  function startSearch(query, { push = true } = {}) {
    if (state.view) showView(null, { push: false });
    state.query = query;
    state.offset = 0;
    if (query.kind !== 'file' && state.queryBlobUrl) {
      URL.revokeObjectURL(state.queryBlobUrl);
      state.queryBlobUrl = null;
    }
    if (push) {
      const url = pageUrl();
      if (url !== location.search && !(url === location.pathname && !location.search)) {
        history.pushState(null, '', url);
      }
    }
    return runSearch(false);
  }

  async function runSearch(append) {
    const query = state.query;
    if (!query) return;
    const seq = ++state.seq;
    clearError();
    ui.results.setAttribute('aria-busy', 'true');
    document.body.classList.add('is-loading');
    if (!append) ui.summary.textContent = 'Searching…';
    const params = searchParams();
    params.set('limit', String(limit()));
    params.set('offset', String(append ? state.offset : 0));
    const counted = attributesOf(CHECKBOX_KINDS).slice(0, MAX_FACETS);
    if (counted.length) params.set('facets', counted.join(','));
    const req = searchRequest(query, params, ui.rerank.checked ? DEFAULT_RERANK_K : 0);
    // An attribute with checked values is counted without its own filter, so that its other
    // values stay in view with what checking them would add.
    const own = append ? [] : counted.filter((n) => state.picked.has(n) && state.picked.get(n).size);
    const ownReqs = own.map((name) => {
      const p = searchParams(name);
      p.set('limit', '1');
      p.set('facets', name);
      return searchRequest(query, p, 0);
    });
    try {
      const res = await req;
      const ownRes = await Promise.all(ownReqs);
      if (seq !== state.seq) return;
      const hits = Array.isArray(res.hits) ? res.hits : [];
      if (!append) {
        releaseBlobs();
        state.hits = [];
        state.focusIndex = 0;
      }
      const start = state.hits.length;
      state.hits.push(...hits);
      state.offset = state.hits.length;
      state.total = typeof res.total === 'number' ? res.total : null;
      state.hasMore = state.total === null ? hits.length >= limit() : state.hits.length < state.total;
      if (!append) {
        const counts = new Map((res.facets || []).map((f) => [f.name, f]));
        for (const r of ownRes) for (const f of r.facets || []) counts.set(f.name, f);
        renderFacets(counts);
      }
      renderSummary(res);
      renderNotices(res.notices);
      renderHits(start, append);
      if (append && hits.length) focusTile(start);
    } catch (err) {
      if (seq !== state.seq) return;
      if (!append) {
        state.hits = [];
        renderHits(0, false);
        renderFacets(new Map());
        ui.summary.textContent = '';
      }
      showError(err, 'The search failed.');
    } finally {
      if (seq === state.seq) {
        ui.results.removeAttribute('aria-busy');
        document.body.classList.remove('is-loading');
        renderEmpty();
      }
    }
  }

  /** The parameters every search of the page sends: the filters (but the product filter of
   * `except`) and the grouping. */
  function searchParams(except) {
    const params = filterParams(new URLSearchParams());
    for (const f of productFilters(except)) params.append('filter', f);
    if (grouped()) params.set('group_by', 'product');
    return params;
  }

  /** Sends `query` with `params` (text queries reranked over `rerankK`). */
  function searchRequest(query, params, rerankK) {
    if (query.kind === 'text') {
      params.set('q', query.q);
      params.set('mode', ui.mode.value);
      params.set('rerank_k', String(rerankK));
      return api(`/api/search?${params}`);
    }
    if (query.kind === 'like') {
      return api(`/api/search/image?${params}`, { method: 'POST', json: { similar_to: query.id } });
    }
    const body = new FormData();
    body.append('image', query.file, query.file.name || 'image');
    return api(`/api/search/image?${params}`, { method: 'POST', body });
  }

  function renderSummary(res) {
    const n = state.total === null ? state.hits.length : state.total;
    const query = state.query;
    const parts = [];
    const noun = grouped() ? (n === 1 ? 'product' : 'products') : (n === 1 ? 'result' : 'results');
    const count = el('strong', { text: `${n}${state.total === null && state.hasMore ? '+' : ''} ${noun}` });
    ui.summary.replaceChildren();
    if (query.kind === 'text') {
      ui.summary.append(count, ' for ', el('q', { class: 'summary-q', text: query.q }));
      parts.push(ui.mode.value);
      parts.push(ui.rerank.checked ? `ITM rerank top ${DEFAULT_RERANK_K}` : 'no rerank');
    } else {
      const thumb = el('img', { class: 'summary-thumb', alt: '' });
      if (query.kind === 'like') {
        loadImage(thumb, `/api/images/${query.id}/thumbnail`);
        ui.summary.append(count, ' similar to ', thumb, el('span', { text: query.name || `image #${query.id}` }));
      } else {
        thumb.src = state.queryBlobUrl;
        ui.summary.append(count, ' similar to ', thumb, el('span', { text: query.file.name || 'your image' }));
      }
    }
    if (typeof res.candidates === 'number') parts.push(`${res.candidates} candidates`);
    if (typeof res.took_ms === 'number') parts.push(`${res.took_ms.toFixed(0)} ms`);
    if (res.truncated) parts.push('truncated');
    if (parts.length) ui.summary.append(el('span', { class: 'summary-meta', text: parts.join(' · ') }));
    if (query.kind !== 'text') {
      ui.summary.append(el('button', {
        type: 'button', class: 'btn btn-link', text: 'Clear',
        onclick: () => resetToHome(),
      }));
    }
  }

  /** The facet panel: checkboxes with counts (`counts`: facet by name, from the last search)
   * for keyword and bool attributes, from-to inputs for number and date ones. */
  function renderFacets(counts) {
    const checkboxes = attributesOf(CHECKBOX_KINDS).slice(0, MAX_FACETS);
    const ranges = attributesOf(RANGE_KINDS);
    ui.facets.hidden = !(state.query && (checkboxes.length || ranges.length));
    if (ui.facets.hidden) {
      ui.facets.replaceChildren();
      return;
    }
    const groups = [];
    for (const name of checkboxes) {
      const picked = state.picked.get(name) || new Set();
      const facet = counts.get(name);
      const values = facet ? facet.values.map((v) => ({ value: v.value, count: v.count })) : [];
      for (const v of picked) if (!values.some((x) => x.value === v)) values.push({ value: v, count: 0 });
      if (!values.length) continue;
      const box = el('fieldset', { class: 'facet', 'data-testid': 'facet', dataset: { facet: name } },
        el('legend', { text: name.replace(/_/g, ' ') }));
      for (const v of values) {
        const input = el('input', {
          type: 'checkbox',
          checked: picked.has(v.value),
          'data-testid': 'facet-option',
          dataset: { facet: name, value: v.value },
          onchange: () => pickValue(name, v.value, input.checked),
        });
        const label = state.schema[name] === 'bool' ? (v.value === 'true' ? 'yes' : 'no') : v.value;
        box.append(el('label', { class: 'facet-value' },
          input,
          el('span', { class: 'facet-label', title: v.value, text: label }),
          el('span', { class: 'facet-count', 'data-testid': 'facet-count', text: fmt.count(v.count) })));
      }
      groups.push(box);
    }
    for (const name of ranges) {
      const type = state.schema[name] === 'date' ? 'date' : 'number';
      const r = state.ranges.get(name) || { min: '', max: '' };
      const input = (end, label) => el('input', {
        type,
        step: type === 'number' ? 'any' : undefined,
        value: r[end],
        placeholder: label,
        'aria-label': `${name} ${label}`,
        'data-testid': `range-${end}`,
        dataset: { facet: name },
        onchange: (ev) => setRange(name, end, ev.target.value.trim()),
        // Enter applies the range (the inputs are outside the search form).
        onkeydown: (ev) => { if (ev.key === 'Enter') ev.target.blur(); },
      });
      groups.push(el('fieldset', { class: 'facet', 'data-testid': 'facet-range', dataset: { facet: name } },
        el('legend', { text: name.replace(/_/g, ' ') }),
        el('div', { class: `facet-range${type === 'date' ? ' is-date' : ''}` }, input('min', 'from'), type === 'date' ? null : '–', input('max', 'to'))));
    }
    ui.facets.replaceChildren(...groups);
  }

  function pickValue(name, value, on) {
    const values = state.picked.get(name) || new Set();
    if (on) values.add(value);
    else values.delete(value);
    if (values.size) state.picked.set(name, values);
    else state.picked.delete(name);
    updateFilterButton();
    if (state.query) startSearch(state.query, { push: state.query.kind !== 'file' });
  }

  function setRange(name, end, value) {
    const r = { min: '', max: '', ...state.ranges.get(name), [end]: value };
    if (r.min || r.max) state.ranges.set(name, r);
    else state.ranges.delete(name);
    updateFilterButton();
    if (state.query) startSearch(state.query, { push: state.query.kind !== 'file' });
  }

  function renderNotices(notices) {
    const list = Array.isArray(notices) ? notices.filter(Boolean) : [];
    ui.notices.replaceChildren(...list.map((n) => el('li', { text: n })));
    ui.notices.hidden = list.length === 0;
  }

  function resetToHome() {
    state.seq += 1;
    state.query = null;
    state.hits = [];
    releaseBlobs();
    ui.q.value = '';
    ui.summary.replaceChildren();
    renderFacets(new Map());
    renderNotices([]);
    renderHits(0, false);
    history.pushState(null, '', pageUrl());
    ui.q.focus();
  }

  // ---------------------------------------------------------------- results grid

  function tileFor(hit, index) {
    const caption = bestCaption(hit);
    const img = el('img', {
      alt: caption || hit.file_name || `image ${hit.id}`,
      loading: 'lazy',
      decoding: 'async',
      draggable: 'false',
      'data-testid': 'result-image',
    });
    img.addEventListener('load', () => tile.classList.add('loaded'));
    img.addEventListener('error', () => tile.classList.add('broken'));
    loadImage(img, hit.thumbnail_url || `/api/images/${hit.id}/thumbnail`);

    const chips = [];
    if (typeof hit.itm_prob === 'number') chips.push(el('span', { class: 'chip chip-accent', title: 'ITM p(match)', text: `p ${fmt.pct(hit.itm_prob)}` }));
    if (typeof hit.score === 'number') chips.push(el('span', { class: 'chip', title: 'final score', text: fmt.num(hit.score, 2) }));

    const tile = el('button', {
      type: 'button',
      class: 'tile',
      tabindex: index === state.focusIndex ? '0' : '-1',
      'aria-label': `${hit.file_name || `Image ${hit.id}`}${caption ? `: ${caption}` : ''}.${flagSummary(hit.flags)} Open details.`,
      'data-testid': 'result',
      dataset: { id: String(hit.id), fileName: hit.file_name || '', index: String(index) },
      onclick: () => openDetail(index),
      onfocus: () => { state.focusIndex = index; setRoving(index); },
    },
    el('span', { class: 'tile-fallback', 'aria-hidden': 'true', text: hit.file_name || `#${hit.id}` }),
    img,
    flagBadge(hit.flags),
    el('span', { class: 'tile-overlay', 'aria-hidden': 'true' },
      el('span', { class: 'tile-caption', text: caption || hit.file_name || '' }),
      el('span', { class: 'tile-chips' }, chips)));

    const like = el('button', {
      type: 'button',
      class: 'tile-like',
      tabindex: '-1',
      title: 'More like this',
      'aria-label': `More like ${hit.file_name || `image ${hit.id}`}`,
      'data-testid': 'tile-more-like-this',
      onclick: (ev) => { ev.stopPropagation(); searchLike(hit); },
    });
    like.innerHTML = '<svg class="icon" viewBox="0 0 24 24" aria-hidden="true" focusable="false"><rect x="3" y="3" width="8" height="8" rx="1.5"/><rect x="13" y="13" width="8" height="8" rx="1.5"/><path d="M15 7h4M17 5v4"/></svg>';

    if (hit.group) return el('li', { class: 'cell card', 'data-testid': 'product-card' }, tile, like, cardBody(hit));
    return el('li', { class: 'cell' }, tile, like);
  }

  const fmtPrice = (n) => (Number.isInteger(n) ? String(n) : n.toFixed(2));

  /** Below a grouped hit's image: the product's title, price and brand, and its other images. */
  function cardBody(hit) {
    const product = hit.product || {};
    const attrs = product.attributes || {};
    const title = product.title || product.id || hit.file_name || `#${hit.id}`;
    const meta = [];
    if (typeof attrs.price === 'number') meta.push(el('span', { class: 'card-price', 'data-testid': 'card-price', text: fmtPrice(attrs.price) }));
    if (attrs.brand !== undefined) meta.push(el('span', { 'data-testid': 'card-brand', text: String(attrs.brand) }));
    const more = hit.group.size - 1;
    return el('div', { class: 'card-body' },
      el('span', { class: 'card-title', title, 'data-testid': 'card-title', text: title }),
      meta.length ? el('span', { class: 'card-meta' }, meta.flatMap((m, i) => (i ? [' · ', m] : [m]))) : null,
      more > 0 ? el('span', { class: 'card-more', 'data-testid': 'card-more', text: `+${more} more image${more === 1 ? '' : 's'}` }) : null);
  }

  function renderHits(start, append) {
    if (!append) ui.results.replaceChildren();
    const frag = document.createDocumentFragment();
    for (let i = start; i < state.hits.length; i += 1) frag.append(tileFor(state.hits[i], i));
    ui.results.append(frag);
    ui.loadMore.hidden = !(state.query && state.hasMore && state.hits.length);
    renderEmpty();
  }

  function tiles() {
    return [...ui.results.querySelectorAll('.tile')];
  }

  function setRoving(index) {
    tiles().forEach((t, i) => { t.tabIndex = i === index ? 0 : -1; });
  }

  function focusTile(index) {
    const all = tiles();
    if (!all.length) return;
    const i = Math.max(0, Math.min(all.length - 1, index));
    state.focusIndex = i;
    setRoving(i);
    all[i].focus();
    all[i].scrollIntoView({ block: 'nearest' });
  }

  function columns() {
    const all = tiles();
    if (all.length < 2) return 1;
    const top = all[0].getBoundingClientRect().top;
    let n = 0;
    for (const t of all) {
      if (Math.abs(t.getBoundingClientRect().top - top) > 2) break;
      n += 1;
    }
    return Math.max(1, n);
  }

  ui.results.addEventListener('keydown', (ev) => {
    if (!ev.target.classList.contains('tile')) return;
    const i = Number(ev.target.dataset.index);
    const cols = columns();
    const moves = {
      ArrowRight: i + 1,
      ArrowLeft: i - 1,
      ArrowDown: i + cols,
      ArrowUp: i - cols,
      Home: 0,
      End: tiles().length - 1,
    };
    if (ev.key in moves) {
      ev.preventDefault();
      const next = moves[ev.key];
      if (next >= 0 && next < tiles().length) focusTile(next);
    } else if (ev.key === 'm' && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      ev.preventDefault();
      searchLike(state.hits[i]);
    }
  });

  // ---------------------------------------------------------------- empty states

  function renderEmpty() {
    if (state.view) {
      ui.empty.hidden = true;
      return;
    }
    const status = state.status;
    const query = state.query;
    const busy = document.body.classList.contains('is-loading');
    let show = false;
    let title = '';
    let text = '';
    const actions = [];
    if (query && !busy && state.hits.length === 0 && ui.error.hidden) {
      show = true;
      if (query.kind === 'text') {
        title = `No matches for “${query.q}”`;
        if (hasFilters()) text = 'Nothing matched within the current filters. Clear them to search everything.';
        else if (ui.mode.value === 'text') text = 'Text mode only finds words that appear in captions, given texts and file names. Hybrid or Vector mode also finds photos by what they look like.';
        else if (status && status.images === 0) text = 'The collection is empty, so there is nothing to find yet.';
        else text = 'Try other words, or describe the scene rather than naming it.';
      } else {
        title = 'No similar images';
        text = hasFilters() ? 'Nothing similar within the current filters.' : 'The collection has no other images to compare with.';
      }
      if (hasFilters()) actions.push(el('button', { type: 'button', class: 'btn', text: 'Clear filters', onclick: clearFilters }));
      if (query.kind === 'text' && ui.mode.value === 'text') {
        actions.push(el('button', { type: 'button', class: 'btn', text: 'Search in Hybrid mode', onclick: () => { ui.mode.value = 'hybrid'; submit(); } }));
      }
    } else if (!query) {
      show = true;
      const ingest = status && status.ingest;
      if (status && status.images === 0 && ingest && ingest.state !== 'idle' && ingest.state !== 'error') {
        title = 'Indexing your photos…';
        text = 'Captions and vectors are being computed. Results appear as soon as the first images are in.';
      } else if (status && status.images === 0) {
        title = 'No images yet';
        text = 'Start the server with --images <folder> to index a folder of photos, or upload one here.';
        actions.push(el('button', { type: 'button', class: 'btn btn-primary', text: 'Upload an image', onclick: openUpload }));
      } else {
        title = 'Search your photos';
        text = `Describe what you are looking for in plain words${status ? ` across ${fmt.count(status.images)} images` : ''}, or drop an image anywhere on this page to find similar ones.`;
        for (const example of ['a dog on the beach', 'people around a table', 'a city at night']) {
          actions.push(el('button', {
            type: 'button', class: 'btn btn-chip', text: example,
            onclick: () => { ui.q.value = example; submit(); },
          }));
        }
      }
    }
    ui.empty.hidden = !show;
    if (show) {
      ui.emptyTitle.textContent = title;
      ui.emptyText.textContent = text;
      ui.emptyActions.replaceChildren(...actions);
    }
  }

  // ---------------------------------------------------------------- search by image

  function searchLike(hit) {
    if (!hit) return;
    if (ui.detail.open) ui.detail.close();
    return startSearch({ kind: 'like', id: hit.id, name: hit.file_name });
  }

  function searchByFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith('image/')) {
      showError(new ApiError(0, 'client', `“${file.name}” is not an image.`), 'Cannot search with this file.');
      return;
    }
    if (state.queryBlobUrl) URL.revokeObjectURL(state.queryBlobUrl);
    state.queryBlobUrl = URL.createObjectURL(file);
    ui.q.value = '';
    history.pushState(null, '', location.pathname);
    return startSearch({ kind: 'file', file }, { push: false });
  }

  ui.imageInput.addEventListener('change', () => {
    const file = ui.imageInput.files && ui.imageInput.files[0];
    ui.imageInput.value = '';
    searchByFile(file);
  });

  let dragDepth = 0;
  const hasFiles = (ev) => ev.dataTransfer && [...ev.dataTransfer.types].includes('Files');
  document.addEventListener('dragenter', (ev) => {
    if (!hasFiles(ev) || ui.upload.open) return;
    dragDepth += 1;
    ui.dropzone.hidden = false;
  });
  document.addEventListener('dragleave', (ev) => {
    if (!hasFiles(ev) || ui.upload.open) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) ui.dropzone.hidden = true;
  });
  document.addEventListener('dragover', (ev) => {
    if (hasFiles(ev)) ev.preventDefault();
  });
  document.addEventListener('drop', (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    dragDepth = 0;
    ui.dropzone.hidden = true;
    const file = ev.dataTransfer.files[0];
    if (ui.upload.open) setUploadFile(file);
    else searchByFile(file);
  });

  // ---------------------------------------------------------------- detail dialog

  function scoreRow(label, value, hint, bar) {
    const dd = el('dd', {}, el('span', { class: 'score-value', text: value }));
    if (typeof bar === 'number' && Number.isFinite(bar)) {
      const meter = el('span', { class: 'bar', 'aria-hidden': 'true' }, el('span', { style: `width:${Math.max(0, Math.min(1, bar)) * 100}%` }));
      dd.prepend(meter);
    }
    return [el('dt', { title: hint, text: label }), dd];
  }

  function renderScores(hit) {
    const box = $('#detail-scores');
    box.replaceChildren();
    if (typeof hit.score !== 'number') {
      box.append(el('p', { class: 'muted', text: 'Not from a search: no scores.' }));
      return;
    }
    const dl = el('dl', { class: 'score-grid' });
    dl.append(
      ...scoreRow('ITM p(match)', fmt.pct(hit.itm_prob), 'Image-text matching head: probability that the query describes this image', hit.itm_prob),
      ...scoreRow('Score', fmt.num(hit.score), 'Final ranking score'),
      ...scoreRow('ITM logit', fmt.num(hit.itm_logit), 'Raw image-text matching logit (rerank)'),
      ...scoreRow('Vector (ITC)', fmt.num(hit.itc), 'Cosine similarity of the query and image embeddings', typeof hit.itc === 'number' ? (hit.itc + 1) / 2 : undefined),
      ...scoreRow('Vector rank', fmt.rank(hit.vector_rank), 'Rank in the vector (ANN) candidates'),
      ...scoreRow('BM25', fmt.num(hit.bm25, 2), 'Text score over captions, given texts and file name'),
      ...scoreRow('Text rank', fmt.rank(hit.text_rank), 'Rank in the BM25 candidates'),
      ...scoreRow('Fused', fmt.num(hit.fused, 4), 'Reciprocal-rank fusion of vector and text ranks'),
    );
    box.append(dl);
  }

  function renderCaptions(list, captions, matched) {
    list.replaceChildren();
    if (!captions.length) {
      list.append(el('li', { class: 'muted', text: 'No captions.' }));
      return;
    }
    for (const c of captions) {
      const badges = [el('span', { class: `badge badge-${c.source || 'other'}`, text: c.source || 'caption' })];
      if (typeof c.p_match === 'number') badges.push(el('span', { class: 'badge', title: 'ITM p(match) of this caption', text: `p ${fmt.pct(c.p_match)}` }));
      if (c.kept === false) badges.push(el('span', { class: 'badge badge-dropped', title: 'Dropped by the CapFilt filter (not searchable)', text: 'filtered' }));
      list.append(el('li', {
        class: `caption${c.kept === false ? ' dropped' : ''}${matched && c.text === matched ? ' is-matched' : ''}`,
        'data-testid': 'detail-caption',
      }, el('span', { class: 'caption-text', text: c.text }), el('span', { class: 'caption-badges' }, badges)));
    }
  }

  function renderMeta(info) {
    const dl = $('#detail-meta');
    const rows = [
      ['Path', info.path],
      ['Size', info.width && info.height ? `${info.width} × ${info.height}${info.size_bytes ? ` · ${fmt.bytes(info.size_bytes)}` : ''}` : null],
      ['Taken', info.exif_date || null],
      ['Modified', info.mtime_unix ? fmt.date(info.mtime_unix) : null],
      ['Added', info.added_unix ? fmt.date(info.added_unix) : null],
      ['Id', `#${info.id}`],
    ];
    dl.replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
  }

  function renderProduct(product) {
    $('#detail-product').hidden = !product;
    if (!product) return;
    const rows = [['Product', product.id], ['Title', product.title], ['Description', product.description]];
    for (const [k, v] of Object.entries(product.attributes || {})) rows.push([k.replace(/_/g, ' '), String(v)]);
    $('#detail-product-meta').replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
  }

  function fillDetail(hit) {
    state.detailHit = hit;
    $('#detail-title').textContent = hit.file_name || `Image #${hit.id}`;
    const img = $('#detail-img');
    img.removeAttribute('src');
    img.alt = bestCaption(hit) || hit.file_name || '';
    loadImage(img, hit.file_url || `/api/images/${hit.id}/file`);
    const matched = $('#detail-matched');
    matched.hidden = !hit.matched_caption;
    matched.textContent = hit.matched_caption ? `“${hit.matched_caption}”` : '';
    renderProduct(hit.product);
    renderFlags(hit.flags);
    renderScores(hit);
    renderCaptions($('#detail-captions'), hit.captions || [], hit.matched_caption);
    $('#detail-given-wrap').hidden = true;
    renderMeta(hit);
    $('#detail-open').href = hit.file_url || `/api/images/${hit.id}/file`;
    $('#detail-prev').disabled = state.detailIndex <= 0;
    $('#detail-next').disabled = state.detailIndex < 0 || state.detailIndex >= state.hits.length - 1;
    // Full record: dates, size, given texts (and captions when the hit had none).
    api(`/api/images/${hit.id}`).then((info) => {
      if (state.detailHit !== hit) return;
      renderMeta(info);
      renderFlags(info.flags);
      // The record has every caption, the ones the filter dropped too (a hit has the kept ones).
      const all = info.captions || [];
      if (all.length) renderCaptions($('#detail-captions'), all, hit.matched_caption);
      const given = (info.given_texts || []).filter((t) => !all.some((c) => c.text === t));
      $('#detail-given-wrap').hidden = given.length === 0;
      $('#detail-given').replaceChildren(...given.map((t) => el('li', { class: 'caption' }, el('span', { class: 'caption-text', text: t }))));
    }).catch((err) => {
      if (state.detailHit === hit) showError(err, 'Could not load the image details.');
    });
  }

  function openDetail(index) {
    const hit = state.hits[index];
    if (!hit) return;
    state.detailIndex = index;
    fillDetail(hit);
    if (!ui.detail.open) ui.detail.showModal();
    $('[data-close]', ui.detail).focus();
  }

  function openRecord(record) {
    state.detailIndex = -1;
    fillDetail(record);
    if (!ui.detail.open) ui.detail.showModal();
    $('[data-close]', ui.detail).focus();
  }

  ui.detail.addEventListener('close', () => {
    state.detailHit = null;
    // Back to the tile of the image last shown (the arrows may have moved on from the opener).
    const want = tiles()[state.detailIndex];
    if (want && state.query && document.activeElement !== want) focusTile(state.detailIndex);
  });
  ui.detail.addEventListener('keydown', (ev) => {
    if (ev.target.matches('input, textarea, select')) return;
    if (ev.key === 'ArrowLeft' && state.detailIndex > 0) { ev.preventDefault(); openDetail(state.detailIndex - 1); }
    if (ev.key === 'ArrowRight' && state.detailIndex >= 0 && state.detailIndex < state.hits.length - 1) { ev.preventDefault(); openDetail(state.detailIndex + 1); }
  });
  $('#detail-prev').addEventListener('click', () => openDetail(state.detailIndex - 1));
  $('#detail-next').addEventListener('click', () => openDetail(state.detailIndex + 1));
  $('#detail-like').addEventListener('click', () => searchLike(state.detailHit));
  $('#detail-delete').addEventListener('click', async () => {
    const hit = state.detailHit;
    if (!hit || !confirm(`Remove “${hit.file_name || `#${hit.id}`}” from the index? The file itself is not deleted.`)) return;
    try {
      await api(`/api/images/${hit.id}`, { method: 'DELETE' });
      const i = state.hits.findIndex((h) => h.id === hit.id);
      state.detailIndex = -1;
      ui.detail.close();
      if (i >= 0) {
        state.hits.splice(i, 1);
        renderHits(0, false);
        focusTile(Math.min(i, state.hits.length - 1));
      }
      toast(`Removed ${hit.file_name || `#${hit.id}`} from the index.`);
      refreshStatus();
    } catch (err) {
      showError(err, 'Could not remove the image.');
    }
  });

  // Clicking the backdrop (outside the dialog box) closes any dialog; so do [data-close] buttons.
  for (const dlg of [ui.detail, ui.upload, ui.key]) {
    dlg.addEventListener('click', (ev) => {
      if (ev.target === dlg) dlg.close();
      if (ev.target.closest('[data-close]')) dlg.close();
    });
  }

  // ---------------------------------------------------------------- upload

  const uploadFile = $('#upload-file');
  const uploadPreview = $('#upload-preview');
  const uploadResult = $('#upload-result');
  let uploadPreviewUrl = null;

  function setUploadFile(file) {
    if (!file) return;
    const dt = new DataTransfer();
    dt.items.add(file);
    uploadFile.files = dt.files;
    showUploadPreview();
  }

  function showUploadPreview() {
    const file = uploadFile.files && uploadFile.files[0];
    if (uploadPreviewUrl) URL.revokeObjectURL(uploadPreviewUrl);
    uploadPreviewUrl = file ? URL.createObjectURL(file) : null;
    uploadPreview.hidden = !file;
    if (file) uploadPreview.src = uploadPreviewUrl;
    $('#upload-placeholder').textContent = file ? file.name : 'Choose an image or drop it here';
  }

  function openUpload() {
    uploadResult.replaceChildren();
    ui.upload.showModal();
    uploadFile.focus();
  }

  uploadFile.addEventListener('change', showUploadPreview);
  $('#upload-open').addEventListener('click', openUpload);

  $('#upload-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const file = uploadFile.files && uploadFile.files[0];
    if (!file) {
      uploadResult.replaceChildren(el('p', { class: 'form-error', text: 'Choose an image first.' }));
      return;
    }
    const body = new FormData();
    body.append('image', file, file.name);
    for (const line of $('#upload-text').value.split('\n')) {
      if (line.trim()) body.append('text', line.trim());
    }
    const submitBtn = $('#upload-submit');
    submitBtn.disabled = true;
    uploadResult.replaceChildren(el('p', { class: 'working' }, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Captioning and indexing…'));
    try {
      const res = await api('/api/images', { method: 'POST', body });
      const record = { ...(res.image || {}), id: res.id };
      const heading = res.duplicate
        ? el('p', { class: 'ok' }, 'Already in the index as ', el('strong', { 'data-testid': 'upload-id', text: `#${res.id}` }), '.')
        : el('p', { class: 'ok' }, 'Added as ', el('strong', { 'data-testid': 'upload-id', text: `#${res.id}` }), '.');
      const caps = el('ul', { class: 'captions' });
      renderCaptions(caps, res.captions || record.captions || [], null);
      uploadResult.replaceChildren(heading, caps, el('div', { class: 'upload-actions' },
        el('button', { type: 'button', class: 'btn', text: 'View', 'data-testid': 'upload-view', onclick: () => { ui.upload.close(); openRecord(record); } }),
        el('button', { type: 'button', class: 'btn', text: 'Find similar', onclick: () => { ui.upload.close(); searchLike(record); } })));
      uploadResult.dataset.id = String(res.id);
      $('#upload-text').value = '';
      refreshStatus();
    } catch (err) {
      uploadResult.replaceChildren(el('p', { class: 'form-error', 'data-testid': 'upload-error', text: `${err.message}${err.code ? ` (${err.code})` : ''}` }));
    } finally {
      submitBtn.disabled = false;
    }
  });

  ui.upload.addEventListener('close', () => {
    uploadFile.value = '';
    showUploadPreview();
  });

  // ---------------------------------------------------------------- API key

  let keyWaiters = [];
  function askKey(reason) {
    $('#key-reason').textContent = reason
      ? `The server said: ${reason.replace(/[.\s]+$/, '')}. Enter the API key; it is kept in this browser only.`
      : 'Enter the API key; it is kept in this browser only.';
    $('#key-input').value = state.key;
    if (!ui.key.open) {
      // A modal dialog cannot open over another modal one in every browser: stack it on top.
      ui.key.showModal();
    }
    $('#key-input').focus();
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  function settleKey(ok) {
    const waiters = keyWaiters;
    keyWaiters = [];
    for (const w of waiters) w(ok);
  }

  $('#key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('#key-input').value.trim();
    writeKey(key);
    updateModerationAccess();
    ui.key.close();
    settleKey(Boolean(key));
    if (key) {
      toast('API key saved in this browser.');
      refreshStatus();
      loadLists();
      refreshReviewCount();
      if (state.view) showView(state.view, { push: false });
    }
  });
  $('#key-clear').addEventListener('click', () => {
    writeKey('');
    updateModerationAccess();
    $('#key-input').value = '';
    ui.key.close();
    toast('API key forgotten.');
  });
  ui.key.addEventListener('close', () => settleKey(false));
  $('#key-open').addEventListener('click', () => { askKey(''); });

  // ---------------------------------------------------------------- moderation: flags

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const svg = (tag, attrs = {}) => {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };

  /** Flags that count: not cleared by a reviewer. */
  const activeFlags = (flags) => (Array.isArray(flags) ? flags : []).filter((f) => !(f.decision && f.decision.verdict === 'cleared'));
  /** 'pending', 'confirmed' or 'cleared'. */
  const flagState = (f) => (f.decision ? f.decision.verdict : 'pending');
  const RULES = { pdq: 'PDQ', itc: 'ITC', both: 'PDQ + ITC' };

  /** Whether the server shows flags to this page: with the key, or on a server without one. */
  function flagsVisible() {
    const auth = state.status && state.status.auth;
    return Boolean(state.key) || Boolean(auth && !auth.writes);
  }

  /** " Flagged by LIST (pending)." for a tile's label, or nothing. */
  function flagSummary(flags) {
    const active = activeFlags(flags);
    if (!active.length) return '';
    const lists = [...new Set(active.map((f) => f.list))].join(', ');
    return ` Flagged by ${lists} (${active.some((f) => !f.decision) ? 'pending review' : 'confirmed'}).`;
  }

  /** The badge of an image's active flags: its list(s), and pending or confirmed. */
  function flagBadge(flags) {
    const active = activeFlags(flags);
    if (!active.length) return null;
    const lists = [...new Set(active.map((f) => f.list))];
    const status = active.some((f) => !f.decision) ? 'pending' : 'confirmed';
    const badge = el('span', {
      class: `flag-badge is-${status}`,
      title: `Flagged by ${lists.join(', ')}: ${status === 'pending' ? 'waiting for review' : 'confirmed by a reviewer'}`,
      'data-testid': 'flag-badge',
      dataset: { state: status, lists: lists.join(' ') },
    },
    el('span', { class: 'flag-list-name', text: lists[0] }),
    lists.length > 1 ? el('span', { text: `+${lists.length - 1}` }) : null,
    el('span', { class: 'flag-state', text: status }));
    badge.prepend(flagIcon());
    return badge;
  }

  function flagIcon() {
    const icon = svg('svg', { class: 'icon', viewBox: '0 0 24 24', 'aria-hidden': 'true', focusable: 'false' });
    icon.append(svg('path', { d: 'M5 21V4' }), svg('path', { d: 'M5 4h11l-2 4 2 4H5' }));
    return icon;
  }

  /** The figures of a flag: rule, PDQ distance, cosine. */
  function flagFigures(f) {
    const bits = [`rule ${RULES[f.rule] || f.rule}`];
    if (typeof f.pdq_distance === 'number') bits.push(`PDQ distance ${f.pdq_distance}`);
    if (typeof f.cosine === 'number') bits.push(`cosine ${fmt.num(f.cosine)}`);
    return bits.join(' · ');
  }

  /** The detail view's match lists: every flag of the image with its state and decision. */
  function renderFlags(flags) {
    const list = Array.isArray(flags) ? flags : [];
    $('#detail-flags').hidden = list.length === 0;
    $('#detail-flag-list').replaceChildren(...list.map((f) => {
      const status = flagState(f);
      const d = f.decision;
      return el('li', { class: `flag-item is-${status}`, 'data-testid': 'detail-flag', dataset: { state: status, list: f.list } },
        el('div', { class: 'flag-item-head' },
          el('strong', { text: f.list }),
          el('span', { class: `badge badge-${status}`, text: status })),
        el('span', { class: 'muted small', text: `entry #${f.entry} · ${flagFigures(f)} · flagged ${fmt.date(f.flagged_unix)}` }),
        d ? el('span', { class: 'small', text: `${d.verdict} by ${d.actor}, ${fmt.date(d.unix)}${d.note ? `: “${d.note}”` : ''}` }) : null,
        status === 'pending' && state.key
          ? el('a', { class: 'btn btn-link', href: `?view=review&list=${encodeURIComponent(f.list)}`, text: 'Review', onclick: (ev) => { ev.preventDefault(); ui.detail.close(); openReview(f.list); } })
          : null);
    }));
  }

  /** The flagged filter (and the Review link) are offered to whoever may see flags. */
  function updateModerationAccess() {
    const visible = flagsVisible();
    ui.flaggedField.hidden = !visible && !ui.flagged.value;
    ui.reviewOpen.hidden = !state.key;
    if (!state.key) {
      ui.reviewCount.hidden = true;
    }
  }

  /** Puts the lists into the flagged filter and the review queue's list picker, keeping the
   * picked values (a value no list has any more stays, so that the URL keeps meaning it). */
  function renderListOptions() {
    const names = state.lists.map((l) => l.name);
    const fill = (select, first, label) => {
      const keep = select.value;
      const want = [...new Set([...names, ...(keep && keep !== '*' ? [keep] : [])])].sort();
      select.replaceChildren(...first, ...want.map((n) => el('option', { value: n, text: label(n) })));
      select.value = keep;
    };
    fill(ui.flagged, [el('option', { value: '', text: 'All images' }), el('option', { value: '*', text: 'Flagged by any list' })], (n) => `Flagged by ${n}`);
    fill($('#review-list'), [el('option', { value: '', text: 'All lists' })], (n) => n);
  }

  function setFlagged(value) {
    if (value && ![...ui.flagged.options].some((o) => o.value === value)) {
      ui.flagged.append(el('option', { value, text: `Flagged by ${value}` }));
    }
    ui.flagged.value = value;
  }

  /** Loads the match lists; quiet (the pages that need them say what went wrong). */
  async function loadLists() {
    try {
      const res = await api('/api/lists', { retry: false });
      state.lists = Array.isArray(res.lists) ? res.lists : [];
    } catch {
      state.lists = [];
    }
    renderListOptions();
    return state.lists;
  }

  /** The count of images waiting for review beside the header's Review link. */
  async function refreshReviewCount() {
    if (!state.key) return;
    try {
      const res = await api('/api/review?limit=1', { retry: false });
      setReviewCount(res.total);
    } catch {
      ui.reviewCount.hidden = true;
    }
  }

  function setReviewCount(n) {
    ui.reviewCount.hidden = !(typeof n === 'number' && n > 0);
    ui.reviewCount.textContent = typeof n === 'number' ? fmt.count(n) : '';
    ui.reviewOpen.setAttribute('aria-label', `Review${n ? `: ${fmt.count(n)} waiting` : ''}`);
  }

  // ---------------------------------------------------------------- moderation: views

  const panels = { review: $('#review-panel'), lists: $('#lists-panel'), audit: $('#audit-panel') };
  const modUnavailable = $('#mod-unavailable');

  function viewUrl(view) {
    const p = new URLSearchParams({ view });
    if (view === 'review' && state.review.list) p.set('list', state.review.list);
    return `?${p}`;
  }

  /** Shows moderation view `view` instead of the search results (`null`: the results again). */
  function showView(view, { push = true, focus = false } = {}) {
    state.view = view;
    const on = Boolean(view);
    ui.moderation.hidden = !on;
    ui.searchView.hidden = on;
    document.body.classList.toggle('is-moderating', on);
    if (on) ui.reviewOpen.setAttribute('aria-current', 'page');
    else ui.reviewOpen.removeAttribute('aria-current');
    if (on) {
      clearError();
      ui.empty.hidden = true;
      for (const [name, panel] of Object.entries(panels)) panel.hidden = name !== view;
      for (const tab of ui.moderation.querySelectorAll('.tab')) {
        if (tab.dataset.view === view) tab.setAttribute('aria-current', 'page');
        else tab.removeAttribute('aria-current');
      }
      modUnavailable.hidden = true;
      if (push && viewUrl(view) !== location.search) history.pushState(null, '', viewUrl(view));
      if (focus) $('#moderation-title').focus();
      if (view === 'review') loadReview();
      else if (view === 'lists') renderLists(true);
      else loadAudit();
    } else {
      renderEmpty();
    }
  }

  function openReview(list = '') {
    state.review.list = list;
    state.review.offset = 0;
    $('#review-list').value = list;
    showView('review', { focus: true });
  }

  // A plain click switches the view in place; with a modifier the link opens as a link does.
  const plainClick = (ev) => ev.button === 0 && !(ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.altKey);
  ui.reviewOpen.addEventListener('click', (ev) => {
    if (!plainClick(ev)) return;
    ev.preventDefault();
    openReview(state.review.list);
  });
  for (const tab of ui.moderation.querySelectorAll('.tab')) {
    tab.addEventListener('click', (ev) => {
      if (!plainClick(ev)) return;
      ev.preventDefault();
      showView(tab.dataset.view);
    });
  }

  /** A moderation request failed: explains a server without a key (403 no_api_key) or a
   * missing key in place of the panel; anything else goes to the error bar. Returns whether
   * the panel was replaced. */
  function moderationFailed(err, what) {
    if (err.status === 403 && err.code === 'no_api_key') {
      showUnavailable('Moderation is off on this server',
        'Match lists, the review queue and the audit log need a server started with --api-key KEY (blipsearch serve --api-key KEY …): every decision is recorded with the key that took it. Restart the server with a key, then enter it here with the key button at the top right.');
      return true;
    }
    if (err.status === 401) {
      showUnavailable('Moderation needs the API key',
        'Enter the server\'s API key (the key button at the top right); it is kept in this browser only.');
      return true;
    }
    showError(err, what);
    return false;
  }

  function showUnavailable(title, text) {
    $('#mod-unavailable-title').textContent = title;
    $('#mod-unavailable-text').textContent = text;
    modUnavailable.hidden = false;
    for (const panel of Object.values(panels)) panel.hidden = true;
  }

  // ---------------------------------------------------------------- moderation: review queue

  const reviewItems = $('#review-items');

  async function loadReview() {
    const seq = ++state.review.seq;
    const r = state.review;
    const params = new URLSearchParams({ offset: String(r.offset), limit: String(REVIEW_PAGE) });
    if (r.list) params.set('list', r.list);
    reviewItems.setAttribute('aria-busy', 'true');
    $('#review-summary').textContent = 'Loading the queue…';
    if (!state.lists.length) loadLists();
    try {
      const res = await api(`/api/review?${params}`);
      if (seq !== r.seq) return;
      const items = Array.isArray(res.items) ? res.items : [];
      r.total = typeof res.total === 'number' ? res.total : items.length;
      // A page past the end (the queue shrank): back to the last page.
      if (!items.length && r.offset > 0 && r.total > 0) {
        r.offset = Math.max(0, Math.floor((r.total - 1) / REVIEW_PAGE) * REVIEW_PAGE);
        return loadReview();
      }
      reviewItems.replaceChildren(...items.map(reviewItem));
      if (!r.list) setReviewCount(r.total);
      renderReviewSummary();
    } catch (err) {
      if (seq !== r.seq) return;
      reviewItems.replaceChildren();
      $('#review-summary').textContent = '';
      moderationFailed(err, 'Could not load the review queue.');
    } finally {
      if (seq === r.seq) reviewItems.removeAttribute('aria-busy');
    }
  }

  function renderReviewSummary() {
    const r = state.review;
    const shown = reviewItems.children.length;
    const where = r.list ? ` from ${r.list}` : '';
    $('#review-summary').replaceChildren(r.total
      ? el('span', {}, el('strong', { text: `${fmt.count(r.total)} image${r.total === 1 ? '' : 's'}` }), ` waiting for review${where}`)
      : el('span', { 'data-testid': 'review-empty', text: `Nothing waiting for review${where}.` }));
    const pager = $('.pager', panels.review);
    pager.hidden = r.total <= REVIEW_PAGE && r.offset === 0;
    $('#review-page').textContent = shown ? `${fmt.count(r.offset + 1)}–${fmt.count(r.offset + shown)} of ${fmt.count(r.total)}` : '';
    $('#review-prev').disabled = r.offset === 0;
    $('#review-next').disabled = r.offset + shown >= r.total;
  }

  $('#review-prev').addEventListener('click', () => {
    state.review.offset = Math.max(0, state.review.offset - REVIEW_PAGE);
    loadReview();
  });
  $('#review-next').addEventListener('click', () => {
    state.review.offset += REVIEW_PAGE;
    loadReview();
  });
  $('#review-reload').addEventListener('click', () => loadReview());
  $('#review-list').addEventListener('change', (ev) => {
    state.review.list = ev.target.value;
    state.review.offset = 0;
    history.replaceState(null, '', viewUrl('review'));
    loadReview();
  });

  /** One image of the queue: the image beside each reference it matched, and the decision. */
  function reviewItem(item) {
    const image = item.image || {};
    const pending = Array.isArray(item.pending) ? item.pending : [];
    const entries = Array.isArray(item.entries) ? item.entries : [];
    const entryOf = (f) => entries.find((e) => e.list === f.list && e.id === f.entry);
    const name = image.file_name || `Image #${image.id}`;
    const headingId = `review-title-${image.id}`;

    const img = el('img', { alt: bestCaption(image) || name, loading: 'lazy', decoding: 'async', 'data-testid': 'review-image' });
    loadImage(img, image.thumbnail_url || `/api/images/${image.id}/thumbnail`);
    const figure = el('figure', { class: 'review-figure' },
      el('button', {
        type: 'button', class: 'review-thumb', title: 'Open the image',
        'aria-label': `Open ${name}`, onclick: () => openRecord(image),
      }, img),
      el('figcaption', {},
        el('span', { class: 'review-side', text: 'Flagged image' }),
        el('span', { class: 'review-path', title: image.path || '', text: image.path || name }),
        el('span', { class: 'muted small', text: [image.width && image.height ? `${image.width} × ${image.height}` : '', image.size_bytes ? fmt.bytes(image.size_bytes) : '', image.added_unix ? `added ${fmt.date(image.added_unix)}` : ''].filter(Boolean).join(' · ') })));

    const li = el('li', {
      class: 'review-item', 'aria-labelledby': headingId, 'data-testid': 'review-item',
      dataset: { id: String(image.id), fileName: image.file_name || '' },
    },
    el('h2', { id: headingId, class: 'review-title' }, name,
      el('span', { class: 'muted small', text: ` #${image.id} · ${pending.length} match${pending.length === 1 ? '' : 'es'} waiting` })),
    el('div', { class: 'review-body' },
      figure,
      el('div', { class: 'review-matches' }, pending.map((f) => matchCard(image, f, entryOf(f))))));
    li.append(decisionForm(image, li));
    return li;
  }

  /** A matched reference: since reference images are not kept, what the entry knows of it
   * (label, source file, list) and how close it is: the rule, PDQ distance, cosine, and the two
   * PDQ hashes as bit grids with the differing bits marked. */
  function matchCard(image, flag, entry) {
    const e = entry || {};
    const title = e.label || e.source || `entry #${flag.entry}`;
    const rows = [
      ['List', flag.list, 'match-list'],
      ['Label', e.label || '—', 'match-label'],
      ['Source', e.source || '—', 'match-source'],
      ['Rule', RULES[flag.rule] || flag.rule, 'match-rule'],
      ['PDQ distance', typeof flag.pdq_distance === 'number' ? `${flag.pdq_distance} of ${PDQ_BITS} bits (match at ≤ ${DEFAULT_PDQ_DISTANCE} by default)` : '—', 'match-distance'],
      ['Cosine', typeof flag.cosine === 'number' ? `${fmt.num(flag.cosine)} (match at ≥ ${DEFAULT_MIN_COSINE} by default)` : '—', 'match-cosine'],
      ['Entry', `#${flag.entry}${e.dihedral ? ' · matches rotations and mirrors' : e.pdq ? ' · plain hash only' : ''}${typeof e.quality === 'number' ? ` · quality ${e.quality}` : ''}`, 'match-entry'],
      ['Flagged', fmt.date(flag.flagged_unix), 'match-flagged'],
    ];
    const dl = el('dl', { class: 'meta match-meta' });
    for (const [k, v, id] of rows) dl.append(el('dt', { text: k }), el('dd', { 'data-testid': id, text: v }));
    return el('section', {
      class: 'match', 'aria-label': `Matched reference ${title} of list ${flag.list}`,
      'data-testid': 'review-match', dataset: { list: flag.list, entry: String(flag.entry), rule: flag.rule },
    },
    el('div', { class: 'match-head' },
      el('span', { class: 'review-side', text: 'Matched reference' }),
      el('span', { class: `badge badge-rule-${flag.rule}`, text: RULES[flag.rule] || flag.rule })),
    el('p', { class: 'match-title', title, 'data-testid': 'match-title', text: title }),
    dl,
    hashCompare(image.pdq, e, flag));
  }

  /** The 256 bits of a hex PDQ hash in coefficient order: bit `16 i + j` is whether DCT
   * coefficient (i, j) (vertical frequency i + 1, horizontal j + 1) is above the median. The
   * reference writes bit `k` as bit `k % 8` of byte `31 - k / 8`. `null` if `hex` is not a hash. */
  function hexBits(hex) {
    if (typeof hex !== 'string' || !/^[0-9a-f]{64}$/i.test(hex)) return null;
    const bits = new Uint8Array(PDQ_BITS);
    for (let k = 0; k < PDQ_BITS; k += 1) {
      const byte = 31 - Math.floor(k / 8);
      bits[k] = (parseInt(hex.slice(2 * byte, 2 * byte + 2), 16) >> (k % 8)) & 1;
    }
    return bits;
  }

  // What the entry's hash variants after the plain one are of the reference image, in the PDQ
  // reference's order of its dihedral hashes.
  const VARIANTS = ['rotated 90° counter-clockwise', 'rotated 180°', 'rotated 270° counter-clockwise',
    'mirrored top-bottom', 'mirrored left-right', 'transposed', 'mirrored about the other diagonal'];

  const hamming = (a, b) => a.reduce((n, bit, i) => n + (bit !== b[i] ? 1 : 0), 0);

  /** A 16 × 16 grid of `bits` (set bits dark, or faint when `diff` is given); `diff` bits in
   * the danger colour. */
  function bitGrid(bits, diff, label, testid) {
    const grid = svg('svg', { class: 'bitgrid', viewBox: '0 0 16 16', role: 'img', 'aria-label': label, 'data-testid': testid });
    grid.append(svg('title'));
    grid.firstChild.textContent = label;
    grid.append(svg('rect', { class: 'bitgrid-bg', width: '16', height: '16' }));
    let on = '';
    let marked = '';
    for (let i = 0; i < PDQ_BITS; i += 1) {
      const cell = `M${i % 16} ${Math.floor(i / 16)}h1v1h-1z`;
      if (bits && bits[i]) on += cell;
      if (diff && diff[i]) marked += cell;
    }
    if (on) grid.append(svg('path', { class: diff ? 'bitgrid-faint' : 'bitgrid-on', d: on }));
    if (marked) grid.append(svg('path', { class: 'bitgrid-diff', d: marked }));
    return grid;
  }

  /** The image's PDQ hash and the entry's nearest one (of its plain hash and, where the API
   * gives them, its seven rotated and mirrored variants) side by side, and their differing
   * bits. */
  function hashCompare(imageHex, entry, flag) {
    const mine = hexBits(imageHex);
    const candidates = [entry.pdq, ...(Array.isArray(entry.pdq_variants) ? entry.pdq_variants : [])].map(hexBits);
    const wrap = el('div', { class: 'pdq-compare', 'data-testid': 'pdq-compare' });
    if (!mine || !candidates[0]) {
      const missing = !mine ? 'The image has no PDQ hash' : 'The entry has no PDQ hash';
      wrap.append(el('p', { class: 'muted small', text: `${missing}: the match is by the ITC rule alone.` }));
      return wrap;
    }
    let best = 0;
    let bestD = Infinity;
    candidates.forEach((c, i) => {
      if (!c) return;
      const d = hamming(mine, c);
      if (d < bestD) { best = i; bestD = d; }
    });
    const theirs = candidates[best];
    const diff = mine.map((b, i) => (b !== theirs[i] ? 1 : 0));
    const refLabel = best === 0 ? 'reference' : `reference, ${VARIANTS[best - 1] || 'rotated or mirrored'}`;
    wrap.dataset.distance = String(bestD);
    wrap.append(
      el('figure', { class: 'pdq-grid' }, bitGrid(mine, null, 'PDQ hash of the flagged image', 'pdq-image'), el('figcaption', { text: 'image' })),
      el('figure', { class: 'pdq-grid' }, bitGrid(theirs, null, `PDQ hash of the ${refLabel}`, 'pdq-reference'), el('figcaption', { 'data-testid': 'pdq-reference-label', text: refLabel })),
      el('figure', { class: 'pdq-grid' }, bitGrid(mine, diff, `${bestD} of ${PDQ_BITS} bits differ`, 'pdq-diff'),
        el('figcaption', { 'data-testid': 'pdq-diff-count', text: `${bestD} bits differ` })));
    const notes = [];
    if (typeof flag.pdq_distance === 'number' && flag.pdq_distance < bestD && entry.dihedral) {
      notes.push(`The match is with a rotated or mirrored variant of the reference (distance ${flag.pdq_distance}); the grids compare with its plain hash.`);
    }
    wrap.append(el('details', { class: 'pdq-hex' },
      el('summary', { text: 'Hashes' }),
      el('code', { text: `image      ${imageHex}` }),
      el('code', { text: `reference  ${best === 0 ? entry.pdq : entry.pdq_variants[best - 1]}` })));
    if (notes.length) wrap.append(el('p', { class: 'muted small', text: notes[0] }));
    wrap.append(el('p', { class: 'muted small', text: 'A cell is one DCT coefficient of the image (low frequencies top left), dark where it is above the median; red cells are the bits that differ.' }));
    return wrap;
  }

  /** Confirm / Clear with an optional note; on success the item leaves the queue in place. */
  function decisionForm(image, li) {
    const noteId = `review-note-${image.id}`;
    const note = el('textarea', { id: noteId, rows: '2', maxlength: '2000', placeholder: 'Why (kept in the audit log)', 'data-testid': 'decision-note' });
    const error = el('p', { class: 'form-error', role: 'alert', 'data-testid': 'decision-error', hidden: true });
    const form = el('form', { class: 'decision', 'data-testid': 'decision-form' },
      el('div', { class: 'field-stack' },
        el('label', { for: noteId }, 'Note ', el('span', { class: 'muted', text: '(optional)' })),
        note),
      el('div', { class: 'decision-actions' },
        el('button', { type: 'submit', class: 'btn btn-danger-solid', value: 'confirmed', 'data-testid': 'decision-confirm', title: 'The image is what the list entry stands for' }, 'Confirm match'),
        el('button', { type: 'submit', class: 'btn', value: 'cleared', 'data-testid': 'decision-clear', title: 'A false match: the image is not flagged again for these entries' }, 'Clear (false match)')),
      error);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const decision = ev.submitter && ev.submitter.value;
      if (decision !== 'confirmed' && decision !== 'cleared') return;
      const buttons = [...form.querySelectorAll('button')];
      buttons.forEach((b) => { b.disabled = true; });
      error.hidden = true;
      try {
        await api(`/api/review/${image.id}`, { method: 'POST', json: { decision, note: note.value.trim() } });
        removeReviewItem(li);
        toast(`${decision === 'confirmed' ? 'Confirmed' : 'Cleared'} ${image.file_name || `#${image.id}`}.`);
      } catch (err) {
        buttons.forEach((b) => { b.disabled = false; });
        if (err.status === 403 || err.status === 401) moderationFailed(err, 'Could not record the decision.');
        else {
          error.textContent = `${err.message}${err.code ? ` (${err.code})` : ''}`;
          error.hidden = false;
        }
      }
    });
    return form;
  }

  function removeReviewItem(li) {
    const r = state.review;
    const next = li.nextElementSibling || li.previousElementSibling;
    li.remove();
    r.total = Math.max(0, r.total - 1);
    if (!r.list) setReviewCount(r.total);
    else refreshReviewCount();
    renderReviewSummary();
    if (next) $('h2', next).setAttribute('tabindex', '-1');
    if (next) $('h2', next).focus();
    else if (r.total > 0) loadReview();
    else $('#review-summary').focus();
  }

  // ---------------------------------------------------------------- moderation: match lists

  const listsBox = $('#lists');
  const listsResult = $('#lists-result');

  async function renderLists(reload) {
    if (reload) {
      listsBox.setAttribute('aria-busy', 'true');
      try {
        const res = await api('/api/lists');
        state.lists = Array.isArray(res.lists) ? res.lists : [];
        renderListOptions();
      } catch (err) {
        listsBox.removeAttribute('aria-busy');
        moderationFailed(err, 'Could not load the match lists.');
        return;
      }
      listsBox.removeAttribute('aria-busy');
    }
    if (!state.lists.length) {
      listsBox.replaceChildren(el('p', { class: 'muted', 'data-testid': 'lists-empty', text: 'No match lists yet. Create one, then add reference images or a file of PDQ hashes to it.' }));
      return;
    }
    listsBox.replaceChildren(...state.lists.map(listCard));
  }

  function listCard(list) {
    const entriesBox = el('div', { class: 'list-entries', 'data-testid': 'list-entries', hidden: true });
    const show = el('button', {
      type: 'button', class: 'btn', 'aria-expanded': 'false', 'data-testid': 'list-show',
      text: 'Show entries',
      onclick: async () => {
        const open = show.getAttribute('aria-expanded') === 'true';
        show.setAttribute('aria-expanded', String(!open));
        show.textContent = open ? 'Show entries' : 'Hide entries';
        entriesBox.hidden = open;
        if (!open) await loadEntries(list.name, entriesBox);
      },
    });
    const result = el('div', { class: 'mod-result', role: 'status', 'aria-live': 'polite', 'data-testid': 'list-add-result' });
    const id = (what) => `list-${list.name}-${what}`;
    const images = el('input', { id: id('images'), type: 'file', accept: 'image/*', multiple: true, 'data-testid': 'list-add-images' });
    const hashes = el('input', { id: id('hashes'), type: 'file', accept: '.csv,.txt,text/csv,text/plain', 'data-testid': 'list-add-hashes' });
    const label = el('input', { id: id('label'), type: 'text', maxlength: '256', placeholder: 'e.g. case 1234', 'data-testid': 'list-add-label' });
    const form = el('form', { class: 'list-add', 'data-testid': 'list-add-form' },
      el('div', { class: 'field-stack' }, el('label', { for: id('images'), text: 'Reference images' }), images,
        el('span', { class: 'muted small', text: 'Their PDQ hashes (all eight rotations and mirrors) and ITC vectors are kept; the images are not.' })),
      el('div', { class: 'field-stack' }, el('label', { for: id('hashes'), text: 'PDQ hash file' }), hashes,
        el('span', { class: 'muted small', text: 'Hex PDQ hashes, one per line, optionally a comma and a label: these match by PDQ alone.' })),
      el('div', { class: 'field-stack' }, el('label', { for: id('label') }, 'Label ', el('span', { class: 'muted', text: '(optional, for the images)' })), label),
      el('div', {}, el('button', { type: 'submit', class: 'btn btn-primary', 'data-testid': 'list-add-submit', text: 'Add to list' })));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      if (!images.files.length && !hashes.files.length) {
        result.replaceChildren(el('p', { class: 'form-error', text: 'Choose reference images, a hash file, or both.' }));
        return;
      }
      const body = new FormData();
      for (const f of images.files) body.append('image', f, f.name);
      if (hashes.files[0]) body.append('pdq', hashes.files[0], hashes.files[0].name);
      if (label.value.trim()) body.append('label', label.value.trim());
      const submit = $('[type=submit]', form);
      submit.disabled = true;
      result.replaceChildren(el('p', { class: 'working' }, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Hashing the references and checking the collection…'));
      try {
        const res = await api(`/api/lists/${encodeURIComponent(list.name)}/entries`, { method: 'POST', body });
        const added = (res.added || []).length;
        const skipped = res.skipped || [];
        result.replaceChildren(
          el('p', { class: 'ok', 'data-testid': 'list-add-summary' },
            `Added ${added} entr${added === 1 ? 'y' : 'ies'}; ${res.flagged || 0} image${res.flagged === 1 ? '' : 's'} newly flagged.`,
            res.flagged ? el('a', { class: 'btn btn-link', href: `?view=review&list=${encodeURIComponent(list.name)}`, text: 'Review them', onclick: (e) => { e.preventDefault(); openReview(list.name); } }) : null),
          skipped.length ? el('ul', { class: 'skipped', 'data-testid': 'list-add-skipped' }, skipped.map((s) => el('li', { text: `${s.source}: ${s.reason}` }))) : null);
        form.reset();
        await refreshListCount(list.name);
        if (!entriesBox.hidden) loadEntries(list.name, entriesBox);
        refreshReviewCount();
      } catch (err) {
        result.replaceChildren(el('p', { class: 'form-error', 'data-testid': 'list-add-error', text: `${err.message}${err.code ? ` (${err.code})` : ''}` }));
      } finally {
        submit.disabled = false;
      }
    });
    const del = el('button', {
      type: 'button', class: 'btn btn-danger', 'data-testid': 'list-delete', text: 'Delete list',
      onclick: async () => {
        if (!confirm(`Delete the match list “${list.name}” and its ${list.entries} entries? Its flags stay on the images; the audit log keeps the deletion.`)) return;
        try {
          await api(`/api/lists/${encodeURIComponent(list.name)}`, { method: 'DELETE' });
          toast(`Deleted the list ${list.name}.`);
          await renderLists(true);
          refreshReviewCount();
        } catch (err) {
          moderationFailed(err, 'Could not delete the list.');
        }
      },
    });
    return el('article', { class: 'list-card', 'aria-labelledby': id('title'), 'data-testid': 'list-card', dataset: { name: list.name } },
      el('div', { class: 'list-head' },
        el('h2', { id: id('title'), text: list.name }),
        el('span', { class: 'list-count muted', 'data-testid': 'list-count', text: entryCount(list.entries) }),
        el('span', { class: 'muted small', text: `created ${fmt.date(list.created_unix)}` }),
        el('span', { class: 'list-actions' },
          show,
          el('a', { class: 'btn', href: `?view=review&list=${encodeURIComponent(list.name)}`, text: 'Review', onclick: (e) => { e.preventDefault(); openReview(list.name); } }),
          del)),
      entriesBox,
      form,
      result);
  }

  const entryCount = (n) => `${fmt.count(n)} entr${n === 1 ? 'y' : 'ies'}`;

  /** Reloads the lists and shows list `name`'s new entry count on its card. */
  async function refreshListCount(name) {
    await loadLists();
    const card = listsBox.querySelector(`[data-name="${CSS.escape(name)}"]`);
    const fresh = state.lists.find((l) => l.name === name);
    if (card && fresh) $('.list-count', card).textContent = entryCount(fresh.entries);
  }

  async function loadEntries(name, box) {
    box.replaceChildren(el('p', { class: 'working' }, el('span', { class: 'spinner', 'aria-hidden': 'true' }), 'Loading…'));
    try {
      const res = await api(`/api/lists/${encodeURIComponent(name)}`);
      const entries = Array.isArray(res.entries) ? res.entries : [];
      if (!entries.length) {
        box.replaceChildren(el('p', { class: 'muted', text: 'No entries yet.' }));
        return;
      }
      const rows = entries.map((e) => el('tr', { 'data-testid': 'list-entry', dataset: { entry: String(e.id) } },
        el('td', { text: e.label || '—' }),
        el('td', { text: e.source || '—' }),
        el('td', {}, e.pdq ? el('code', { class: 'hash', title: e.pdq, text: `${e.pdq.slice(0, 16)}…` }) : '—'),
        el('td', { text: [e.dihedral ? '8 variants' : e.pdq ? 'plain' : '', e.itc ? 'ITC' : '', typeof e.quality === 'number' ? `q ${e.quality}` : ''].filter(Boolean).join(' · ') }),
        el('td', { text: fmt.date(e.added_unix) }),
        el('td', {}, el('button', {
          type: 'button', class: 'btn btn-link btn-danger', 'data-testid': 'entry-remove',
          'aria-label': `Remove entry ${e.label || e.source || e.id}`, text: 'Remove',
          onclick: async () => {
            if (!confirm(`Remove the entry ${e.label || e.source || `#${e.id}`} from ${name}?`)) return;
            try {
              await api(`/api/lists/${encodeURIComponent(name)}/entries/${e.id}`, { method: 'DELETE' });
              toast(`Removed ${e.label || e.source || `entry #${e.id}`} from ${name}.`);
              await refreshListCount(name);
              await loadEntries(name, box);
              refreshReviewCount();
              // Focus stays in the list: the next entry's Remove, or the list's toggle.
              const next = box.querySelector('[data-testid=entry-remove]') || box.closest('.list-card').querySelector('[data-testid=list-show]');
              if (next) next.focus();
            } catch (err) {
              moderationFailed(err, 'Could not remove the entry.');
            }
          },
        }))));
      box.replaceChildren(el('div', { class: 'table-wrap' }, el('table', { class: 'entries' },
        el('caption', { class: 'visually-hidden', text: `Entries of ${name}` }),
        el('thead', {}, el('tr', {}, ['Label', 'Source', 'PDQ', 'Matches by', 'Added', ''].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, rows))));
    } catch (err) {
      box.replaceChildren();
      moderationFailed(err, 'Could not load the entries.');
    }
  }

  $('#list-create').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $('#list-name');
    const name = input.value.trim();
    if (!name) return;
    // Creating a list that exists answers it as it is: say so.
    const existed = state.lists.some((l) => l.name === name);
    try {
      const info = await api('/api/lists', { method: 'POST', json: { name } });
      input.value = '';
      listsResult.replaceChildren(el('p', { class: 'ok', 'data-testid': 'list-create-ok' }, existed
        ? `The list ${name} exists already (${entryCount(info.entries)}).`
        : `Created the list ${name}.`));
      await renderLists(true);
      const card = listsBox.querySelector(`[data-name="${CSS.escape(name)}"]`);
      if (card) $('input[type=file]', card).focus();
    } catch (err) {
      if (err.status === 403 && err.code === 'no_api_key') moderationFailed(err);
      else listsResult.replaceChildren(el('p', { class: 'form-error', 'data-testid': 'list-create-error', text: `${err.message}${err.code ? ` (${err.code})` : ''}` }));
    }
  });

  // ---------------------------------------------------------------- moderation: audit log

  const auditRows = $('#audit-rows');

  /** The `seq` of the log's last event (0 when empty). The API reads forward from `after`, so
   * this bisects on "is there an event after X" (about 2·log2(events) small requests). */
  async function lastAuditSeq() {
    const next = async (after) => {
      const res = await api(`/api/audit?after=${after}&limit=1`);
      return res.entries && res.entries.length ? res.entries[0].seq : 0;
    };
    let lo = await next(0);
    if (!lo) return 0;
    // Invariant: an event `lo` exists and none is after `hi`.
    let hi = Math.max(lo * 2, lo + 64);
    for (let s = await next(hi); s; s = await next(hi)) {
      lo = s;
      hi = s * 2;
    }
    while (lo < hi) {
      const mid = Math.floor((lo + hi + 1) / 2);
      const s = await next(mid - 1);
      if (s) lo = s;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The newest events (`older`: the page before the oldest one shown), newest first. */
  async function loadAudit(older = false) {
    const a = state.audit;
    const seq = ++a.seq;
    $('#audit-summary').textContent = 'Loading…';
    try {
      const to = older ? a.oldest - 1 : await lastAuditSeq();
      if (seq !== a.seq) return;
      const after = Math.max(0, to - AUDIT_PAGE);
      const res = to > 0 ? await api(`/api/audit?after=${after}&limit=${AUDIT_PAGE}`) : { entries: [] };
      if (seq !== a.seq) return;
      const events = (res.entries || []).filter((e) => e.seq <= to).reverse();
      if (!older) auditRows.replaceChildren();
      auditRows.append(...events.map(auditRow));
      if (events.length) a.oldest = events[events.length - 1].seq;
      else if (!older) a.oldest = 0;
      $('#audit-older').hidden = !(a.oldest > 1);
      const n = auditRows.children.length;
      $('#audit-summary').textContent = n ? `The latest ${fmt.count(n)} event${n === 1 ? '' : 's'}, newest first.` : 'The audit log is empty.';
    } catch (err) {
      if (seq !== a.seq) return;
      $('#audit-summary').textContent = '';
      moderationFailed(err, 'Could not load the audit log.');
    }
  }

  const AUDIT_FIXED = ['seq', 'time', 'actor', 'action'];

  function auditRow(e) {
    const details = Object.entries(e).filter(([k]) => !AUDIT_FIXED.includes(k)).map(([k, v]) => {
      const text = typeof v === 'string' ? v : JSON.stringify(v);
      return el('span', { class: 'kv' }, el('span', { class: 'muted', text: `${k} ` }), text.length > 200 ? `${text.slice(0, 200)}…` : text);
    });
    const when = Date.parse(e.time);
    return el('tr', { 'data-testid': 'audit-row', dataset: { action: e.action, seq: String(e.seq) } },
      el('td', { class: 'num', text: String(e.seq) }),
      el('td', { title: e.time, text: Number.isNaN(when) ? e.time : new Date(when).toLocaleString() }),
      el('td', {}, el('code', { text: e.actor })),
      el('td', {}, el('span', { class: `badge badge-action-${e.action}`, text: e.action })),
      el('td', {}, el('div', { class: 'kvs' }, details)));
  }

  $('#audit-reload').addEventListener('click', () => loadAudit());
  $('#audit-older').addEventListener('click', () => loadAudit(true));

  // ---------------------------------------------------------------- status and ingest progress

  let pollTimer = 0;
  /** Polls /api/status; `ask` lets a 401 open the key dialog (the first call, not every poll).
   * Resolves once this poll is done. */
  async function refreshStatus(ask = false) {
    clearTimeout(pollTimer);
    let active = false;
    try {
      const s = await api('/api/status', { retry: ask === true });
      state.status = s;
      active = renderStatus(s);
    } catch (err) {
      if (err.status === 401) {
        state.protectReads = true;
        ui.footerStats.textContent = 'This server needs an API key to read.';
      } else {
        ui.footerStats.textContent = `Status unavailable: ${err.message}`;
      }
    }
    pollTimer = setTimeout(refreshStatus, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  function renderStatus(s) {
    const ing = s.ingest || {};
    const active = ing.state === 'scanning' || ing.state === 'indexing';
    if (s.auth && s.auth.reads) state.protectReads = true;
    ui.ingest.hidden = !(active || ing.state === 'error');
    ui.ingest.classList.toggle('is-error', ing.state === 'error');
    if (ing.state === 'scanning') {
      ui.ingestText.textContent = 'Scanning folders for new photos…';
      ui.ingestProgress.removeAttribute('value');
    } else if (ing.state === 'indexing') {
      const total = ing.total || 0;
      const done = ing.done || 0;
      const name = ing.current ? ing.current.split(/[\\/]/).pop() : '';
      ui.ingestText.textContent = `Indexing ${fmt.count(done)} of ${fmt.count(total)}${name ? ` · ${name}` : ''}${ing.failed ? ` · ${ing.failed} failed` : ''}`;
      ui.ingestProgress.max = Math.max(1, total);
      ui.ingestProgress.value = done;
    } else if (ing.state === 'error') {
      ui.ingestText.textContent = `Indexing stopped: ${ing.last_error || 'unknown error'}`;
      ui.ingestProgress.value = 0;
    }
    if (state.ingestWasActive && !active && state.query) ui.ingestRefresh.hidden = false;
    if (active && state.query) ui.ingestRefresh.hidden = false;
    if (!state.query) ui.ingestRefresh.hidden = true;
    // Images indexed just now may have been flagged.
    if (state.ingestWasActive && !active && state.key) refreshReviewCount();
    state.ingestWasActive = active;
    if (!active && ing.state !== 'error' && !ui.ingestRefresh.hidden) {
      ui.ingest.hidden = false;
      ui.ingestText.textContent = `Indexing finished${ing.failed ? ` (${ing.failed} failed)` : ''}.`;
      ui.ingestProgress.max = 1;
      ui.ingestProgress.value = 1;
    }

    const models = s.models || {};
    // A local model directory is shown by its last two path parts (the full path in the title).
    const short = (m) => (m && m.startsWith('/') ? m.split('/').filter(Boolean).slice(-2).join('/') : m);
    const bits = [`${fmt.count(s.images)} images`];
    if (models.retrieval) bits.push(`retrieval: ${short(models.retrieval)}`);
    bits.push(`captions: ${short(models.caption) || 'off'}`);
    ui.footerStats.title = [models.retrieval, models.caption].filter(Boolean).join('\n');
    if (s.device) bits.push(s.device);
    if (s.version) bits.push(`v${s.version}`);
    ui.footerStats.textContent = bits.join(' · ');

    const schema = s.attributes && typeof s.attributes === 'object' ? s.attributes : {};
    if (!state.schemaLoaded || JSON.stringify(schema) !== JSON.stringify(state.schema)) {
      state.schema = schema;
      state.schemaLoaded = true;
      state.urlFilters = new URLSearchParams(location.search).getAll('filter');
      applyUrlFilters();
      ui.groupField.hidden = !hasProducts();
    }
    updateModerationAccess();

    const folders = Array.isArray(s.folders) ? s.folders : [];
    ui.folderList.replaceChildren(...folders.map((f) => el('option', { value: f })));
    if (!state.query) renderEmpty();
    return active;
  }

  ui.ingestRefresh.addEventListener('click', () => {
    ui.ingestRefresh.hidden = true;
    if (!state.ingestWasActive) ui.ingest.hidden = true;
    runSearch(false);
  });

  // ---------------------------------------------------------------- wiring

  function submit() {
    const q = ui.q.value.trim();
    if (!q) {
      ui.q.focus();
      if (state.query && state.query.kind !== 'text') return runSearch(false);
      return;
    }
    return startSearch({ kind: 'text', q });
  }

  function clearFilters() {
    ui.folder.value = '';
    ui.dateFrom.value = '';
    ui.dateTo.value = '';
    ui.flagged.value = '';
    state.picked = new Map();
    state.ranges = new Map();
    updateFilterButton();
    if (state.query) startSearch(state.query);
  }

  ui.form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit();
  });
  // Changing an option re-runs the current search at once (mode and rerank only apply to text).
  for (const control of [ui.mode, ui.rerank, ui.limit, ui.dateFrom, ui.dateTo, ui.group, ui.flagged]) {
    control.addEventListener('change', () => {
      updateFilterButton();
      const query = state.query;
      if (!query) return;
      if (query.kind !== 'text' && (control === ui.mode || control === ui.rerank)) {
        history.replaceState(null, '', query.kind === 'like' ? pageUrl() : location.pathname);
        return;
      }
      startSearch(query, { push: query.kind !== 'file' });
    });
  }
  ui.folder.addEventListener('change', () => {
    updateFilterButton();
    if (state.query) startSearch(state.query, { push: state.query.kind !== 'file' });
  });
  ui.clearFilters.addEventListener('click', clearFilters);
  ui.loadMore.addEventListener('click', () => runSearch(true));
  $('#error-close').addEventListener('click', clearError);

  document.addEventListener('keydown', (ev) => {
    if (ev.key !== '/' || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target.closest('input, textarea, select, [contenteditable]')) return;
    if (document.querySelector('dialog[open]')) return;
    ev.preventDefault();
    ui.q.focus();
    ui.q.select();
  });

  window.addEventListener('popstate', () => {
    const query = applyUrl();
    showView(state.view, { push: false });
    if (state.view) return;
    if (query) startSearch(query, { push: false });
    else {
      state.seq += 1;
      state.query = null;
      state.hits = [];
      renderHits(0, false);
      renderFacets(new Map());
      ui.summary.replaceChildren();
      renderNotices([]);
    }
  });

  // Start: restore the search in the URL; search once the status says which product
  // attributes there are (the URL's filters and the facets depend on them).
  const initial = applyUrl();
  if (state.view) showView(state.view, { push: false });
  renderEmpty();
  if (!initial && !state.view) ui.q.focus();
  if (state.key) {
    loadLists();
    refreshReviewCount();
  }
  refreshStatus(true).then(() => {
    if (initial && !state.query) startSearch(initial, { push: false });
  });
})();
