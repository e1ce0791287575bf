// Browser test of the blipsearch web UI in real headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core). Run through tests/browser/run.sh, which starts a real
// `blipsearch serve` on fixture images with the tiny fixture models and sets:
//   BLIPSEARCH_URL        base URL of the running server (required)
//   EXPECTED_IMAGES       number of images the server indexes at start (required)
//   QUERY_IMAGE           an indexed image: searching by it must rank it first (required)
//   DROP_IMAGE            another indexed image, dropped onto the page (required)
//   UPLOAD_IMAGE          an image that is not indexed yet: uploaded through the UI (required)
//   BLIPSEARCH_API_KEY    the server's --api-key, if any: the test types it when the UI asks
//   ARTIFACT_DIR          where screenshots go (default target/browser)
//   CHROMIUM              browser binary (default /usr/bin/chromium)
//   SERVER_PID            the server's pid: waiting stops early if it exits
//   UI_TEST               `protected-reads` for the short test of a server run with --protect-reads,
//                         `catalogue` for the facets and product cards over the test catalogue
//                         (tests/api.rs, `catalogue`), `moderation` for match lists, flags, the
//                         review queue and the audit log, `no-key` for a server without a key
//                         (after `moderation`)
//   REFERENCE_IMAGES      for `moderation`: two reference images, separated by ':', a copy of
//                         QUERY_IMAGE with text on it and a copy of UPLOAD_IMAGE mirrored left-right
// Exit code 0 when every step passed; on failure a screenshot `failure.png` is saved.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`environment variable ${name} is required`);
  return v;
};

const BASE = env('BLIPSEARCH_URL').replace(/\/$/, '');
const EXPECTED_IMAGES = Number(env('EXPECTED_IMAGES'));
const QUERY_IMAGE = env('QUERY_IMAGE');
const DROP_IMAGE = env('DROP_IMAGE');
const UPLOAD_IMAGE = env('UPLOAD_IMAGE');
const API_KEY = process.env.BLIPSEARCH_API_KEY || '';
const ARTIFACTS = env('ARTIFACT_DIR', 'target/browser');
const CHROMIUM = env('CHROMIUM', '/usr/bin/chromium');
const SERVER_PID = Number(process.env.SERVER_PID || 0);
const alive = (pid) => {
  try { process.kill(pid, 0); return true; } catch { return false; }
};
// A made-up word: only the uploaded image's given text contains it.
const UPLOAD_WORD = 'zanzibarquokka';

fs.mkdirSync(ARTIFACTS, { recursive: true });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    if (SERVER_PID && !alive(SERVER_PID)) throw new Error(`the server (pid ${SERVER_PID}) exited while waiting for ${what}`);
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await sleep(500);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

/** The server is up, its models are loaded and the start-up ingest has finished. */
async function waitForServer() {
  const headers = API_KEY ? { Authorization: `Bearer ${API_KEY}` } : {};
  await waitFor('/readyz', async () => (await fetch(`${BASE}/readyz`, { headers })).ok, 300_000);
  return waitFor('start-up ingest', async () => {
    const s = await (await fetch(`${BASE}/api/status`, { headers })).json();
    if (s.ingest && s.ingest.state === 'error') throw new Error(`ingest error: ${s.ingest.last_error}`);
    return s.ingest && s.ingest.state === 'idle' && s.images >= EXPECTED_IMAGES ? s : null;
  }, 300_000);
}

const steps = [];
async function step(name, fn) {
  const t0 = Date.now();
  process.stdout.write(`- ${name} ... `);
  await fn();
  const ms = Date.now() - t0;
  steps.push([name, ms]);
  console.log(`ok (${ms} ms)`);
}

/** All result thumbnails have loaded real pixels; returns how many there are. */
async function thumbnailsLoaded(page) {
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll('[data-testid=result-image]')];
    return imgs.length > 0 && imgs.every((i) => i.complete);
  }, null, { timeout: 60_000 });
  const sizes = await page.$$eval('[data-testid=result-image]', (imgs) => imgs.map((i) => [i.naturalWidth, i.naturalHeight, i.currentSrc]));
  for (const [w, h, src] of sizes) assert.ok(w > 0 && h > 0, `thumbnail ${src} did not load (naturalWidth ${w})`);
  return sizes.length;
}

async function resultCount(page) {
  return page.locator('[data-testid=result]').count();
}

async function waitForResults(page) {
  await page.waitForSelector('[data-testid=result]', { timeout: 120_000 });
  await page.waitForFunction(() => !document.body.classList.contains('is-loading'), null, { timeout: 120_000 });
}

/** Opens a fresh browser page, runs `body(page)`, fails on uncaught page errors. */
async function withPage(body) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, colorScheme: 'light' });
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    // 401 answers are expected when the server has a key; anything else the page logs as an
    // error is reported (and failures of the app's own code arrive as pageerror).
    if (msg.type() === 'error' && !/401/.test(msg.text())) console.log(`  [console] ${msg.text()}`);
  });

  try {
    await body(page);
    assert.deepEqual(pageErrors, [], 'uncaught errors in the page');
  } catch (err) {
    await page.screenshot({ path: path.join(ARTIFACTS, 'failure.png') }).catch(() => {});
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join('\n')}`);
    throw err;
  } finally {
    await browser.close();
  }
}

/** The whole UI against a server whose writes need the key. */
async function fullTest(status) {
  await withPage(async (page) => {
    let query = '';

    await step('home page: empty state and collection size', async () => {
      await page.goto(`${BASE}/`);
      await page.waitForSelector('[data-testid=empty-state]', { state: 'visible' });
      assert.match(await page.textContent('#empty-title'), /Search your photos/);
      await page.waitForFunction((n) => document.querySelector('[data-testid=footer-stats]').textContent.includes(`${n} images`), status.images);
      assert.equal(await page.title(), 'blipsearch');
      // The search box has focus on load: typing searches at once.
      assert.equal(await page.evaluate(() => document.activeElement.id), 'q');
    });

    await step('text search with Enter shows a grid of loaded thumbnails', async () => {
      // Hybrid mode: the vector side ranks every image, whatever the (tiny, random) model.
      query = 'a cat sitting on a sofa';
      await page.fill('[data-testid=search-input]', query);
      await page.keyboard.press('Enter');
      await waitForResults(page);
      const n = await thumbnailsLoaded(page);
      assert.ok(n >= Math.min(status.images, 2), `expected results, got ${n}`);
      assert.equal(new URL(page.url()).searchParams.get('q'), query);
      assert.match(await page.textContent('[data-testid=summary]'), /results? for/);
      assert.ok(await page.isHidden('[data-testid=empty-state]'));
      // A folder collection has no product attributes: no facets, no grouping.
      assert.ok(await page.isHidden('[data-testid=facets]'));
      assert.ok(await page.isHidden('[data-testid=group-toggle]'));
    });

    await step('arrow keys move through the grid; Enter opens the detail dialog', async () => {
      await page.focus('[data-testid=result] >> nth=0');
      await page.keyboard.press('ArrowRight');
      assert.equal(await page.evaluate(() => document.activeElement.dataset.index), '1');
      await page.keyboard.press('ArrowLeft');
      assert.equal(await page.evaluate(() => document.activeElement.dataset.index), '0');
      // '/' jumps back to the search box; Tab from there leads into the grid again.
      await page.keyboard.press('/');
      assert.equal(await page.evaluate(() => document.activeElement.id), 'q');
      await page.focus('[data-testid=result] >> nth=0');
      await page.keyboard.press('Enter');
      await page.waitForSelector('[data-testid=detail]', { state: 'visible' });
      assert.ok(await page.evaluate(() => document.querySelector('#detail').open));
    });

    await step('detail dialog shows the image, its captions and scores', async () => {
      await page.waitForFunction(() => {
        const img = document.querySelector('[data-testid=detail-image]');
        return img.complete && img.naturalWidth > 0;
      }, null, { timeout: 30_000 });
      const captions = await page.$$eval('[data-testid=detail-caption] .caption-text', (els) => els.map((e) => e.textContent.trim()));
      assert.ok(captions.length > 0 && captions.every((c) => c.length > 0), `captions: ${JSON.stringify(captions)}`);
      const scores = await page.textContent('[data-testid=detail-scores]');
      for (const label of ['ITM p(match)', 'Vector (ITC)', 'BM25', 'Fused']) assert.ok(scores.includes(label), `scores lack ${label}: ${scores}`);
      await page.waitForFunction(() => /Path/.test(document.querySelector('[data-testid=detail-meta]').textContent));
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui-detail.png') });
      await page.keyboard.press('Escape');
      await page.waitForSelector('[data-testid=detail]', { state: 'hidden' });
      await page.waitForFunction(() => document.activeElement && document.activeElement.dataset.testid === 'result');
    });

    await step('reloading the URL restores the search', async () => {
      await page.reload();
      await waitForResults(page);
      assert.equal(await page.inputValue('[data-testid=search-input]'), query);
      await thumbnailsLoaded(page);
    });

    await step('search by image ranks the same image first', async () => {
      await page.setInputFiles('[data-testid=image-search-input]', QUERY_IMAGE);
      await page.waitForFunction(() => /similar to/.test(document.querySelector('[data-testid=summary]').textContent), null, { timeout: 120_000 });
      await waitForResults(page);
      await thumbnailsLoaded(page);
      const top = await page.getAttribute('[data-testid=result] >> nth=0', 'data-file-name');
      assert.equal(top, path.basename(QUERY_IMAGE));
    });

    await step('dropping an image on the page searches by it', async () => {
      const bytes = fs.readFileSync(DROP_IMAGE).toString('base64');
      const name = path.basename(DROP_IMAGE);
      const dataTransfer = await page.evaluateHandle(({ bytes, name }) => {
        const bin = Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bin], name, { type: name.endsWith('.png') ? 'image/png' : 'image/jpeg' }));
        return dt;
      }, { bytes, name });
      await page.dispatchEvent('main', 'dragenter', { dataTransfer });
      assert.ok(await page.isVisible('#dropzone'), 'the drop zone did not appear');
      await page.dispatchEvent('main', 'drop', { dataTransfer });
      await page.waitForFunction((n) => document.querySelector('[data-testid=summary]').textContent.includes(n), name, { timeout: 120_000 });
      await waitForResults(page);
      await thumbnailsLoaded(page);
      assert.ok(await page.isHidden('#dropzone'));
      assert.equal(await page.getAttribute('[data-testid=result] >> nth=0', 'data-file-name'), name);
    });

    await step('"more like this" from the detail dialog', async () => {
      await page.click('[data-testid=result] >> nth=1');
      await page.waitForSelector('[data-testid=detail]', { state: 'visible' });
      const id = await page.getAttribute('[data-testid=result] >> nth=1', 'data-id');
      await page.click('[data-testid=more-like-this]');
      await page.waitForSelector('[data-testid=detail]', { state: 'hidden' });
      await page.waitForFunction((want) => new URL(location.href).searchParams.get('like') === want, id);
      await waitForResults(page);
      assert.ok(await thumbnailsLoaded(page) > 0);
      assert.match(await page.textContent('[data-testid=summary]'), /similar to/);
    });

    await step('a server error is shown from its JSON body', async () => {
      const bad = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'blipsearch-ui-')), 'broken.png');
      fs.writeFileSync(bad, 'this is not a png');
      await page.setInputFiles('[data-testid=image-search-input]', bad);
      await page.waitForSelector('[data-testid=error]', { state: 'visible', timeout: 60_000 });
      const text = await page.textContent('[data-testid=error]');
      assert.match(text, /HTTP 4\d\d/, `error text: ${text}`);
      await page.click('#error-close');
    });

    let uploadedId = '';
    await step('upload with a description returns an id', async () => {
      await page.click('[data-testid=upload-open]');
      await page.waitForSelector('[data-testid=upload-dialog]', { state: 'visible' });
      await page.setInputFiles('[data-testid=upload-file]', UPLOAD_IMAGE);
      await page.fill('[data-testid=upload-text]', `a ${UPLOAD_WORD} on the launch pad`);
      await page.click('[data-testid=upload-submit]');
      if (API_KEY) {
        // Writes need the key: the UI asks for it on the 401 and retries.
        await page.waitForSelector('[data-testid=key-dialog]', { state: 'visible', timeout: 30_000 });
        await page.fill('[data-testid=key-input]', API_KEY);
        await page.click('[data-testid=key-save]');
      }
      await page.waitForSelector('[data-testid=upload-id], [data-testid=upload-error]', { timeout: 180_000 });
      const err = await page.$('[data-testid=upload-error]');
      assert.equal(err, null, `upload failed: ${err && await err.textContent()}`);
      uploadedId = (await page.textContent('[data-testid=upload-id]')).replace('#', '');
      assert.match(uploadedId, /^\d+$/);
      assert.match(await page.textContent('[data-testid=upload-result]'), /Added as/);
      await page.keyboard.press('Escape');
      await page.waitForSelector('[data-testid=upload-dialog]', { state: 'hidden' });
      await page.waitForFunction((n) => document.querySelector('[data-testid=footer-stats]').textContent.includes(`${n} images`), status.images + 1, { timeout: 30_000 });
    });

    await step('the uploaded image is findable by its description', async () => {
      await page.selectOption('[data-testid=mode]', 'text');
      await page.fill('[data-testid=search-input]', UPLOAD_WORD);
      await page.keyboard.press('Enter');
      await waitForResults(page);
      await thumbnailsLoaded(page);
      assert.equal(await page.getAttribute('[data-testid=result] >> nth=0', 'data-id'), uploadedId);
      assert.equal(new URL(page.url()).searchParams.get('mode'), 'text');
    });

    await step('no match gives a helpful empty state', async () => {
      await page.fill('[data-testid=search-input]', 'xqzvwk');
      await page.keyboard.press('Enter');
      await page.waitForSelector('[data-testid=empty-state]', { state: 'visible', timeout: 60_000 });
      assert.match(await page.textContent('#empty-title'), /No matches/);
      assert.equal(await resultCount(page), 0);
    });

    await step('screenshot of a result grid', async () => {
      await page.selectOption('[data-testid=mode]', 'hybrid');
      await page.fill('[data-testid=search-input]', query);
      await page.keyboard.press('Enter');
      await waitForResults(page);
      await thumbnailsLoaded(page);
      await page.hover('[data-testid=result] >> nth=0');
      await sleep(300);
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui.png') });
    });
  });
}

/** A server run with --protect-reads: the UI asks for the key at once and loads images with it. */
async function protectedReadsTest(status) {
  assert.ok(API_KEY, 'the protected-reads test needs BLIPSEARCH_API_KEY');
  await withPage(async (page) => {
    await step('protected reads: a shared search link asks for the key first', async () => {
      await page.goto(`${BASE}/?q=${encodeURIComponent('a photo')}`);
      await page.waitForSelector('[data-testid=key-dialog]', { state: 'visible', timeout: 30_000 });
      assert.match(await page.textContent('#key-reason'), /key/i);
      await page.fill('[data-testid=key-input]', API_KEY);
      await page.keyboard.press('Enter');
      await page.waitForSelector('[data-testid=key-dialog]', { state: 'hidden' });
    });

    await step('protected reads: results and thumbnails load with the key', async () => {
      await waitForResults(page);
      await thumbnailsLoaded(page);
      // <img src> cannot send a header: the UI fetches with the key and shows blob: URLs.
      const srcs = await page.$$eval('[data-testid=result-image]', (imgs) => imgs.map((i) => i.currentSrc));
      assert.ok(srcs.every((u) => u.startsWith('blob:')), `thumbnail sources: ${srcs.slice(0, 3)}`);
      await page.waitForFunction((n) => document.querySelector('[data-testid=footer-stats]').textContent.includes(`${n} images`), status.images, { timeout: 30_000 });
    });

    await step('protected reads: the detail dialog loads the original', async () => {
      await page.click('[data-testid=result] >> nth=0');
      await page.waitForFunction(() => {
        const img = document.querySelector('[data-testid=detail-image]');
        return img.complete && img.naturalWidth > 0;
      }, null, { timeout: 30_000 });
      await page.waitForFunction(() => document.querySelectorAll('[data-testid=detail-caption]').length > 0);
      await page.keyboard.press('Escape');
    });

    await step('protected reads: the key survives a reload (localStorage)', async () => {
      await page.reload();
      await waitForResults(page);
      await thumbnailsLoaded(page);
      assert.ok(await page.isHidden('[data-testid=key-dialog]'));
    });
  });
}

/** The counts a facet shows, by value. */
async function facetCounts(page, name) {
  return page.$$eval(`[data-testid=facet][data-facet="${name}"] [data-testid=facet-option]`, (inputs) => Object.fromEntries(
    inputs.map((i) => [i.dataset.value, Number(i.closest('label').querySelector('[data-testid=facet-count]').textContent.replace(/\D/g, ''))])));
}

/** Waits until the grid shows `n` results after the page's last search. */
async function waitForCount(page, n, what) {
  await page.waitForFunction((n) => !document.body.classList.contains('is-loading')
    && document.querySelectorAll('[data-testid=result]').length === n, n, { timeout: 60_000 })
    .catch(async () => { throw new Error(`${what}: expected ${n} results, got ${await resultCount(page)}`); });
}

/** The test catalogue (tests/api.rs, `catalogue`): facets narrow, a price range, product cards. */
async function catalogueTest(status) {
  assert.deepEqual(status.attributes, { brand: 'keyword', category: 'keyword', color: 'keyword', in_stock: 'bool', price: 'number', released: 'date' });
  const brands = { acme: 5, zenith: 1, 'x" or id > 0 or "': 1 };
  await withPage(async (page) => {
    await step('catalogue: a search shows facet counts of its results', async () => {
      // Vector candidates over the whole small collection: every image is a result.
      await page.goto(`${BASE}/?q=${encodeURIComponent('a photo')}&mode=vector&rerank=0`);
      await waitForResults(page);
      await waitForCount(page, 8, 'unfiltered');
      await page.waitForSelector('[data-testid=facets]', { state: 'visible' });
      assert.deepEqual(await facetCounts(page, 'brand'), brands);
      assert.deepEqual(await facetCounts(page, 'color'), { blue: 3, red: 3, green: 1 });
      assert.deepEqual(await facetCounts(page, 'in_stock'), { true: 4, false: 3 });
      assert.ok(await page.isVisible('[data-testid=facet-range][data-facet=price]'));
      assert.ok(await page.isVisible('[data-testid=group-toggle]'));
      await thumbnailsLoaded(page);
    });

    await step('catalogue: ticking a brand narrows the results and the other facets', async () => {
      await page.check('[data-testid=facet-option][data-facet=brand][data-value=acme]');
      await waitForCount(page, 5, 'brand acme');
      assert.deepEqual(new URL(page.url()).searchParams.getAll('filter'), ['brand:acme']);
      // The brand facet still offers the other brands (counted without its own filter).
      await page.waitForFunction(() => document.querySelectorAll('[data-testid=facet][data-facet=color] [data-testid=facet-option]').length === 2);
      assert.deepEqual(await facetCounts(page, 'brand'), brands);
      assert.deepEqual(await facetCounts(page, 'color'), { blue: 3, red: 2 });
      assert.ok(await page.isChecked('[data-testid=facet-option][data-facet=brand][data-value=acme]'));
      await thumbnailsLoaded(page);
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui-facets.png') });
    });

    await step('catalogue: a price range narrows further', async () => {
      await page.fill('[data-testid=range-max][data-facet=price]', '100');
      await page.press('[data-testid=range-max][data-facet=price]', 'Enter');
      // acme under 100: the Trail runner's two images.
      await waitForCount(page, 2, 'brand acme, price ..100');
      assert.deepEqual(new URL(page.url()).searchParams.getAll('filter'), ['brand:acme', 'price:..100']);
      await page.fill('[data-testid=range-max][data-facet=price]', '');
      await page.press('[data-testid=range-max][data-facet=price]', 'Enter');
      await waitForCount(page, 5, 'range cleared');
    });

    await step('catalogue: grouping shows one card per product', async () => {
      await page.check('[data-testid=group-toggle]');
      await page.waitForFunction(() => !document.body.classList.contains('is-loading')
        && document.querySelectorAll('[data-testid=product-card]').length === 2, null, { timeout: 60_000 });
      assert.equal(new URL(page.url()).searchParams.get('group'), '1');
      const cards = await page.$$eval('[data-testid=product-card]', (cs) => cs.map((c) => [
        c.querySelector('[data-testid=card-title]').textContent,
        c.querySelector('[data-testid=card-price]').textContent,
        c.querySelector('[data-testid=card-brand]').textContent,
        (c.querySelector('[data-testid=card-more]') || { textContent: '' }).textContent,
      ]).sort());
      assert.deepEqual(cards, [
        ['Summit boot', '120', 'acme', '+2 more images'],
        ['Trail runner', '59.90', 'acme', '+1 more image'],
      ]);
      assert.match(await page.textContent('[data-testid=summary]'), /2 products for/);
      await thumbnailsLoaded(page);
      // A card opens the detail view of its image, with the product's attributes.
      await page.click('[data-testid=product-card] [data-testid=result] >> nth=0');
      await page.waitForSelector('[data-testid=detail-product]', { state: 'visible' });
      const product = await page.textContent('[data-testid=detail-product]');
      assert.match(product, /brand\s*acme/);
      assert.match(product, /Summit boot|Trail runner/);
      await page.keyboard.press('Escape');
      await page.waitForSelector('[data-testid=detail]', { state: 'hidden' });
      await page.hover('[data-testid=result] >> nth=0');
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui-products.png') });
    });

    await step('catalogue: unticking the brand shows every product again', async () => {
      await page.uncheck('[data-testid=facet-option][data-facet=brand][data-value=acme]');
      // Four products and the image without one.
      await page.waitForFunction(() => !document.body.classList.contains('is-loading')
        && document.querySelectorAll('[data-testid=product-card]').length === 5, null, { timeout: 60_000 });
      assert.deepEqual(await facetCounts(page, 'brand'), { acme: 2, zenith: 1, 'x" or id > 0 or "': 1 });
      // Reloading keeps the grouping.
      await page.reload();
      await page.waitForFunction(() => document.querySelectorAll('[data-testid=product-card]').length === 5, null, { timeout: 60_000 });
      assert.ok(await page.isChecked('[data-testid=group-toggle]'));
    });
  });
}

// ---------------------------------------------------------------- moderation

const LIST = 'browser-bank';
const LIST_LABEL = 'browser test bank';
const CONFIRM_NOTE = 'the reference itself: confirmed by the browser test';
const CLEAR_NOTE = 'cleared by the browser test';

/** GET `path` of the API with the key; the parsed JSON. */
async function apiGet(pathAndQuery) {
  const res = await fetch(`${BASE}${pathAndQuery}`, { headers: API_KEY ? { Authorization: `Bearer ${API_KEY}` } : {} });
  assert.ok(res.ok, `GET ${pathAndQuery}: HTTP ${res.status} ${await res.clone().text()}`);
  return res.json();
}

/** Enters `key` in the key dialog. */
async function saveKey(page, key) {
  await page.click('[data-testid=key-open]');
  await page.waitForSelector('[data-testid=key-dialog]', { state: 'visible' });
  await page.fill('[data-testid=key-input]', key);
  await page.click('[data-testid=key-save]');
  await page.waitForSelector('[data-testid=key-dialog]', { state: 'hidden' });
}

/** The flag badges of the grid: file name -> [state, lists]. */
async function badges(page) {
  return page.$$eval('[data-testid=result]', (tiles) => Object.fromEntries(tiles.map((t) => {
    const b = t.querySelector('[data-testid=flag-badge]');
    return [t.dataset.fileName, b ? [b.dataset.state, b.dataset.lists] : null];
  })));
}

/** A text search over every image (hybrid: the vector side ranks them all). */
async function searchAll(page) {
  await page.fill('[data-testid=search-input]', 'a photo');
  await page.keyboard.press('Enter');
  await waitForResults(page);
  await thumbnailsLoaded(page);
}

/** Match lists, flags, the review queue and the audit log, through the UI with the key. The two
 * references are altered copies of two indexed images (text on one, the other mirrored): each
 * flags its original, the mirrored one through the reference's dihedral hashes, and nothing
 * else (the tiny model's ITC cosines of other images stay below the threshold). */
async function moderationTest(status) {
  assert.ok(API_KEY, 'the moderation test needs BLIPSEARCH_API_KEY');
  const refs = env('REFERENCE_IMAGES').split(path.delimiter);
  assert.equal(refs.length, 2, 'REFERENCE_IMAGES: two paths');
  // The first flags QUERY_IMAGE, the second the image uploaded by the full test (found by the
  // word of its description; uploads are stored under a name of their own).
  const confirmName = path.basename(QUERY_IMAGE);
  const uploaded = await apiGet(`/api/search?q=${UPLOAD_WORD}&mode=text&rerank_k=0`);
  assert.equal(uploaded.hits.length, 1, 'the full test uploaded an image');
  const clearName = uploaded.hits[0].file_name;
  const before = await apiGet('/api/audit?limit=1000');
  const seenSeq = before.next_after;

  await withPage(async (page) => {
    await step('moderation: the Review link and the flagged filter come with the key', async () => {
      await page.goto(`${BASE}/`);
      await page.waitForFunction((n) => document.querySelector('[data-testid=footer-stats]').textContent.includes(`${n} images`), status.images);
      assert.ok(await page.isHidden('[data-testid=review-open]'), 'Review is offered without a key');
      assert.ok(await page.isHidden('[data-testid=flagged-filter]'), 'the flagged filter is offered without a key');
      await saveKey(page, API_KEY);
      await page.waitForSelector('[data-testid=review-open]', { state: 'visible' });
      await page.waitForSelector('[data-testid=flagged-filter]', { state: 'visible' });
    });

    await step('moderation: an empty queue, then a list made in the Lists panel', async () => {
      await page.click('[data-testid=review-open]');
      await page.waitForSelector('[data-testid=review-panel]', { state: 'visible' });
      assert.equal(new URL(page.url()).searchParams.get('view'), 'review');
      await page.waitForSelector('[data-testid=review-empty]');
      assert.equal(await page.locator('[data-testid=review-item]').count(), 0);
      assert.ok(await page.isHidden('[data-testid=results]'));
      await page.click('[data-testid=tab-lists]');
      await page.waitForSelector('[data-testid=lists-panel]', { state: 'visible' });
      await page.fill('[data-testid=list-name]', LIST);
      await page.click('[data-testid=list-create]');
      await page.waitForSelector(`[data-testid=list-card][data-name="${LIST}"]`);
      assert.match(await page.textContent(`[data-testid=list-card][data-name="${LIST}"] [data-testid=list-count]`), /^0 entries$/);
      // Creating it again keeps the one list; a bad name (past the browser's own check of the
      // pattern) is refused with the server's reason.
      await page.fill('[data-testid=list-name]', LIST);
      await page.click('[data-testid=list-create]');
      await page.waitForFunction(() => /exists already/.test(document.querySelector('[data-testid=lists-result]').textContent));
      assert.equal(await page.locator('[data-testid=list-card]').count(), 1);
      await page.fill('[data-testid=list-name]', '-bad');
      await page.evaluate(() => document.querySelector('#list-name').removeAttribute('pattern'));
      await page.click('[data-testid=list-create]');
      await page.waitForSelector('[data-testid=list-create-error]');
      assert.match(await page.textContent('[data-testid=list-create-error]'), /list name .*\(bad_request\)/);
    });

    await step('moderation: reference images added to the list flag their copies', async () => {
      const card = `[data-testid=list-card][data-name="${LIST}"]`;
      await page.setInputFiles(`${card} [data-testid=list-add-images]`, refs);
      await page.fill(`${card} [data-testid=list-add-label]`, LIST_LABEL);
      await page.click(`${card} [data-testid=list-add-submit]`);
      await page.waitForSelector(`${card} [data-testid=list-add-summary], ${card} [data-testid=list-add-error]`, { timeout: 120_000 });
      const summary = await page.textContent(`${card} [data-testid=list-add-result]`);
      assert.match(summary, /Added 2 entries; 2 images newly flagged/, summary);
      await page.waitForFunction((sel) => /^2 entries$/.test(document.querySelector(sel).textContent), `${card} [data-testid=list-count]`);
      await page.click(`${card} [data-testid=list-show]`);
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 2, `${card} [data-testid=list-entry]`);
      const entries = await page.textContent(`${card} [data-testid=list-entries]`);
      for (const r of refs) assert.ok(entries.includes(path.basename(r)), `entries lack ${path.basename(r)}: ${entries}`);
      await page.waitForFunction(() => document.querySelector('[data-testid=review-count]').textContent === '2');
    });

    await step('moderation: a hash file adds a hash-only entry; removing it and deleting a list', async () => {
      // The UI asks before it removes or deletes anything.
      page.on('dialog', (d) => d.accept());
      const card = `[data-testid=list-card][data-name="${LIST}"]`;
      const hashes = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'blipsearch-hashes-')), 'bank.csv');
      fs.writeFileSync(hashes, `${'0f'.repeat(32)},hash-only entry\nnot-a-hash\n`);
      await page.setInputFiles(`${card} [data-testid=list-add-hashes]`, hashes);
      await page.click(`${card} [data-testid=list-add-submit]`);
      await page.waitForFunction((sel) => /Added 1 entry; 0 images newly flagged/.test(document.querySelector(sel).textContent), `${card} [data-testid=list-add-result]`, { timeout: 60_000 });
      assert.match(await page.textContent(`${card} [data-testid=list-add-skipped]`), /not-a-hash|line 2/);
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 3, `${card} [data-testid=list-entry]`);
      const row = `${card} [data-testid=list-entry]:has-text("hash-only entry")`;
      assert.match(await page.textContent(row), /bank\.csv[\s\S]*plain/);
      await page.click(`${row} [data-testid=entry-remove]`);
      await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 2, `${card} [data-testid=list-entry]`);
      assert.match(await page.textContent(`${card} [data-testid=list-count]`), /^2 entries$/);
      // A list made and deleted again.
      await page.fill('[data-testid=list-name]', 'scratch');
      await page.click('[data-testid=list-create]');
      await page.waitForSelector('[data-testid=list-card][data-name=scratch]');
      await page.click('[data-testid=list-card][data-name=scratch] [data-testid=list-delete]');
      await page.waitForSelector('[data-testid=list-card][data-name=scratch]', { state: 'detached' });
      assert.equal(await page.locator('[data-testid=list-card]').count(), 1);
    });

    await step('moderation: flagged results carry a badge; the flagged filter narrows to them', async () => {
      await searchAll(page);
      assert.ok(await page.isHidden('[data-testid=moderation]'));
      const all = await badges(page);
      assert.ok(Object.keys(all).length >= 3, `expected every image: ${JSON.stringify(all)}`);
      for (const [name, badge] of Object.entries(all)) {
        const want = name === confirmName || name === clearName ? ['pending', LIST] : null;
        assert.deepEqual(badge, want, `badge of ${name}`);
      }
      await page.selectOption('[data-testid=flagged-filter]', LIST);
      await page.waitForFunction(() => !document.body.classList.contains('is-loading')
        && document.querySelectorAll('[data-testid=result]').length === 2, null, { timeout: 60_000 });
      assert.equal(new URL(page.url()).searchParams.get('flagged'), LIST);
      assert.deepEqual(Object.keys(await badges(page)).sort(), [confirmName, clearName].sort());
      // The detail view lists the flag.
      await page.click('[data-testid=result] >> nth=0');
      await page.waitForSelector('[data-testid=detail-flags]', { state: 'visible' });
      const flag = await page.textContent('[data-testid=detail-flag]');
      assert.match(flag, new RegExp(`${LIST}[\\s\\S]*pending`));
      await page.keyboard.press('Escape');
      await page.waitForSelector('[data-testid=detail]', { state: 'hidden' });
    });

    await step('moderation: the queue shows each image beside its matched reference', async () => {
      await page.click('[data-testid=review-open]');
      await page.waitForFunction(() => document.querySelectorAll('[data-testid=review-item]').length === 2, null, { timeout: 30_000 });
      assert.match(await page.textContent('[data-testid=review-summary]'), /2 images waiting for review/);
      for (const [name, ref, variant] of [[confirmName, refs[0], /^reference$/], [clearName, refs[1], /^reference, mirrored left-right$/]]) {
        const item = `[data-testid=review-item][data-file-name="${name}"]`;
        const text = async (id) => (await page.textContent(`${item} [data-testid=${id}]`)).trim();
        assert.equal(await text('match-list'), LIST);
        assert.equal(await text('match-label'), LIST_LABEL);
        assert.equal(await text('match-source'), path.basename(ref));
        assert.match(await text('match-rule'), /PDQ/, `${name} matches by PDQ`);
        const distance = Number((await text('match-distance')).split(' ')[0]);
        assert.ok(distance <= 31, `PDQ distance of ${name}: ${distance}`);
        assert.match(await text('match-cosine'), /^-?[01]\.\d{3} /);
        // The two hashes as bit grids (the reference's variant that matched), and their
        // difference: as many bits as the server's distance.
        assert.equal(await page.locator(`${item} [data-testid=pdq-compare] svg`).count(), 3);
        assert.match(await text('pdq-reference-label'), variant);
        assert.equal(await text('pdq-diff-count'), `${distance} bits differ`);
        const on = await page.$eval(`${item} [data-testid=pdq-image] .bitgrid-on`, (p) => p.getAttribute('d').split('M').length - 1);
        assert.ok(on > 64 && on < 192, `set bits of a PDQ hash: ${on}`);
        await page.waitForFunction((sel) => {
          const img = document.querySelector(sel);
          return img && img.complete && img.naturalWidth > 0;
        }, `${item} [data-testid=review-image]`, { timeout: 30_000 });
      }
      await page.waitForSelector('#toast', { state: 'hidden', timeout: 10_000 });
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui-review.png'), fullPage: true });
    });

    await step('moderation: confirm one and clear the other with notes; the queue empties in place', async () => {
      await page.evaluate(() => { window.__samePage = true; });
      const item = (name) => `[data-testid=review-item][data-file-name="${name}"]`;
      await page.fill(`${item(confirmName)} [data-testid=decision-note]`, CONFIRM_NOTE);
      await page.click(`${item(confirmName)} [data-testid=decision-confirm]`);
      await page.waitForSelector(item(confirmName), { state: 'detached' });
      assert.match(await page.textContent('[data-testid=review-summary]'), /1 image waiting for review/);
      await page.waitForFunction(() => document.querySelector('[data-testid=review-count]').textContent === '1');
      await page.fill(`${item(clearName)} [data-testid=decision-note]`, CLEAR_NOTE);
      await page.click(`${item(clearName)} [data-testid=decision-clear]`);
      await page.waitForSelector(item(clearName), { state: 'detached' });
      await page.waitForSelector('[data-testid=review-empty]');
      assert.ok(await page.isHidden('[data-testid=review-count]'));
      assert.ok(await page.evaluate(() => window.__samePage), 'the page reloaded');
      // The server agrees.
      assert.equal((await apiGet('/api/review')).total, 0);
    });

    await step('moderation: the audit log records the decisions', async () => {
      const log = await apiGet(`/api/audit?after=${seenSeq}&limit=1000`);
      const decisions = log.entries.filter((e) => e.action === 'decision');
      assert.equal(decisions.length, 2, JSON.stringify(log.entries));
      const text = JSON.stringify(decisions);
      for (const want of [CONFIRM_NOTE, CLEAR_NOTE, 'confirmed', 'cleared']) assert.ok(text.includes(want), `audit lacks ${want}: ${text}`);
      assert.ok(decisions.every((e) => /^key:[0-9a-f]{8}$/.test(e.actor)), text);
      assert.ok(!JSON.stringify(log).includes(API_KEY), 'the key is never logged');
      for (const want of ['list_create', 'entries_add', 'match', 'entry_remove', 'list_delete']) assert.ok(log.entries.some((e) => e.action === want), `no ${want}`);
      // The Audit view shows the newest first.
      await page.click('[data-testid=tab-audit]');
      await page.waitForSelector('[data-testid=audit-row]');
      assert.equal(new URL(page.url()).searchParams.get('view'), 'audit');
      const rows = await page.$$eval('[data-testid=audit-row]', (trs) => trs.map((tr) => [Number(tr.dataset.seq), tr.dataset.action, tr.textContent]));
      assert.equal(rows[0][0], log.next_after, 'the newest event comes first');
      assert.equal(rows[0][1], 'decision');
      assert.ok(rows[0][2].includes(CLEAR_NOTE), rows[0][2]);
      assert.ok(rows.every(([seq], i) => i === 0 || seq < rows[i - 1][0]), 'newest first');
      await page.screenshot({ path: path.join(ARTIFACTS, 'ui-audit.png') });
    });

    await step('moderation: the confirmed image keeps its badge, the cleared one loses it', async () => {
      // Back to the flagged search (the browser's history), now with one image.
      await page.goBack();
      await page.goBack();
      await page.waitForSelector('[data-testid=results]', { state: 'visible' });
      await page.waitForFunction((n) => !document.body.classList.contains('is-loading')
        && document.querySelectorAll('[data-testid=result]').length === n, 1, { timeout: 60_000 });
      assert.deepEqual(await badges(page), { [confirmName]: ['confirmed', LIST] });
    });
  });
}

/** A server without a key over the moderated collection: flags show to everyone, moderation
 * is refused and the Review page says why. */
async function noKeyTest(status) {
  assert.equal(API_KEY, '', 'the no-key test runs against a server without a key');
  const confirmName = path.basename(QUERY_IMAGE);
  await withPage(async (page) => {
    await step('no key: flags show to everyone, with the flagged filter', async () => {
      await page.goto(`${BASE}/`);
      await page.waitForFunction((n) => document.querySelector('[data-testid=footer-stats]').textContent.includes(`${n} images`), status.images);
      await page.waitForSelector('[data-testid=flagged-filter]', { state: 'visible' });
      assert.ok(await page.isHidden('[data-testid=review-open]'));
      await searchAll(page);
      const all = await badges(page);
      assert.deepEqual(Object.entries(all).filter(([, b]) => b), [[confirmName, ['confirmed', LIST]]]);
    });

    await step('no key: the Review page explains that moderation needs --api-key', async () => {
      await saveKey(page, 'a-key-this-server-does-not-have');
      await page.click('[data-testid=review-open]');
      await page.waitForSelector('[data-testid=moderation-unavailable]', { state: 'visible' });
      const text = await page.textContent('[data-testid=moderation-unavailable]');
      assert.match(text, /--api-key/);
      assert.ok(await page.isHidden('[data-testid=review-panel]'));
    });
  });
}

async function main() {
  const status = await waitForServer();
  console.log(`server ready: ${status.images} images, models ${JSON.stringify(status.models)}`);
  if (process.env.UI_TEST === 'protected-reads') await protectedReadsTest(status);
  else if (process.env.UI_TEST === 'catalogue') await catalogueTest(status);
  else if (process.env.UI_TEST === 'moderation') await moderationTest(status);
  else if (process.env.UI_TEST === 'no-key') await noKeyTest(status);
  else await fullTest(status);
  console.log(`browser test passed: ${steps.length} steps; screenshots in ${ARTIFACTS}/`);
}

main().catch((err) => {
  console.error(`\nFAILED: ${err.stack || err}`);
  process.exit(1);
});
