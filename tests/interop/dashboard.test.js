// The dashboard in a real browser: Debian's Chromium driven by playwright-core. Logs in, sees
// a database appear after a PUT, watches a replication reach completion, sees a plugin error
// with its design document and document id, opens a document with a conflict. Screenshots go
// to tests/interop/artifacts/ (kept by CI as test artifacts).
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { chromium } = require('playwright-core');
const { ThaliNode, tempDir, PASSWORD } = require('./harness');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(__dirname, 'artifacts');
// Without these Chromium reaches out to Google's services from a closed network.
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

let node;
let context;
let page;

async function api(method, p, body) {
  const r = await fetch(`http://127.0.0.1:${node.port}${p}`, {
    method,
    headers: { Authorization: 'Basic ' + Buffer.from(`admin:${PASSWORD}`).toString('base64'),
      'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, json: await r.json().catch(() => null) };
}

async function shot(name) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `dashboard-${name}.png`), fullPage: true });
}

test.before(async () => {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM}: apt-get install chromium`);
  node = await ThaliNode.start('dashboard');
  context = await chromium.launchPersistentContext(tempDir('chromium'), {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1400, height: 1000 },
  });
  page = await context.newPage();
});

test.after(async () => {
  if (context) await context.close();
  if (node) { await node.stop(); await node.destroy(); }
});

test('log in', async () => {
  await page.goto(`http://127.0.0.1:${node.port}/_thali/`);
  await page.waitForSelector('#login-form', { state: 'visible' });
  await page.fill('input[name=password]', 'wrong');
  await page.click('#login-form button');
  await page.waitForFunction(() => document.getElementById('login-error').textContent.length > 0);
  await page.fill('input[name=password]', PASSWORD);
  await page.click('#login-form button');
  await page.waitForSelector('#app', { state: 'visible' });
  await page.waitForFunction(() => document.getElementById('live').textContent === 'live');
  const key = await page.textContent('#node-key');
  assert.match(key, /^ed25519:[a-z2-7]{52}$/);
  // The session survives a reload (cookie).
  await page.reload();
  await page.waitForSelector('#app', { state: 'visible' });
});

test('a database appears after a PUT', async () => {
  assert.equal((await api('PUT', '/fresh')).status, 201);
  assert.equal((await api('PUT', '/fresh/one', { v: 1 })).status, 201);
  await page.waitForSelector('tr[data-db="fresh"]', { timeout: 10000 });
  await page.waitForFunction(() => document.querySelector('tr[data-db="fresh"] td:nth-child(2)').textContent === '1');
  await shot('databases');
});

test('a replication reaches completion', async () => {
  assert.equal((await api('PUT', '/src')).status, 201);
  const docs = Array.from({ length: 300 }, (_, i) => ({ _id: `d${String(i).padStart(4, '0')}`, i }));
  assert.equal((await api('POST', '/src/_bulk_docs', { docs })).status, 201);
  await api('PUT', '/_replicator');
  const r = await api('PUT', '/_replicator/job1', { source: 'src', target: 'dst', create_target: true });
  assert.equal(r.status, 201, JSON.stringify(r.json));
  await page.waitForFunction(() => {
    const row = document.querySelector('#replications tr[data-id="job1"]');
    return row && row.querySelector('[data-testid=state]').textContent.startsWith('completed')
      && row.querySelector('[data-testid=written]').textContent === '300';
  }, null, { timeout: 30000 });
  await shot('replication');
});

test('a plugin error shows its design document and document', async () => {
  assert.equal((await api('PUT', '/plug')).status, 201);
  const ddoc = { language: 'lua', validate_doc_update: 'function(doc) while true do end end' };
  assert.equal((await api('PUT', '/plug/_design/spin', ddoc)).status, 201);
  const w = await api('PUT', '/plug/victim', { v: 1 });
  assert.ok(w.status >= 400, JSON.stringify(w));
  await page.waitForFunction(() => {
    const t = document.getElementById('plugin-errors').textContent;
    return t.includes('victim') && t.includes('_design/spin') && t.includes('validate_doc_update');
  }, null, { timeout: 10000 });
  await shot('plugin-error');
});

test('a document with a conflict shows it', async () => {
  assert.equal((await api('PUT', '/conf')).status, 201);
  const a = { _id: 'c', _rev: '1-aaaa', v: 'a' };
  const b = { _id: 'c', _rev: '1-bbbb', v: 'b' };
  assert.equal((await api('POST', '/conf/_bulk_docs', { docs: [a, b], new_edits: false })).status, 201);
  await page.waitForSelector('tr[data-db="conf"] a');
  await page.click('tr[data-db="conf"] a');
  await page.click('#b-docs a[data-doc="c"]');
  await page.waitForSelector('[data-testid=conflicts]');
  const text = await page.textContent('[data-testid=conflicts]');
  assert.match(text, /1-aaaa/);
  await shot('conflict');
});

test('hostile values show as text', async () => {
  const evil = '<img src=x onerror="window.__xss=1">';
  let dialogs = 0;
  page.on('dialog', (d) => { dialogs += 1; d.dismiss(); });
  // A replication whose source and planted state fields are markup (the state is stripped).
  const r = await api('PUT', '/_replicator/evil', {
    source: evil, target: 'nowhere', _replication_stats: { docs_written: evil },
  });
  assert.equal(r.status, 201, JSON.stringify(r.json));
  // A validator error carrying markup, on a document whose id is markup.
  assert.equal((await api('PUT', '/xss')).status, 201);
  assert.equal((await api('PUT', `/xss/${encodeURIComponent(evil)}`, { v: 1 })).status, 201);
  const ddoc = { validate_doc_update: `function (d) { throw({forbidden: ${JSON.stringify(evil)}}); }` };
  assert.equal((await api('PUT', '/xss/_design/v', ddoc)).status, 201);
  const lua = { language: 'lua', validate_doc_update: `function(doc) error(${JSON.stringify(evil)}) end` };
  assert.equal((await api('PUT', '/xss/_design/w', lua)).status, 201);
  const w = await api('PUT', `/xss/${encodeURIComponent(evil + '2')}`, { v: 1 });
  assert.ok(w.status >= 400, JSON.stringify(w));
  await page.waitForFunction((e) => document.getElementById('replications').textContent.includes(e), evil,
    { timeout: 15000 });
  await page.waitForSelector('tr[data-db="xss"] a');
  await page.click('tr[data-db="xss"] a');
  await page.waitForFunction((e) => document.getElementById('b-docs').textContent.includes(e), evil);
  await page.click(`#b-docs a`);
  await page.waitForFunction((e) => document.getElementById('b-doc').textContent.includes(e), evil);
  await shot('hostile-values');
  const result = await page.evaluate(() => ({
    xss: window.__xss, imgs: document.querySelectorAll('img[src="x"]').length,
  }));
  assert.deepEqual(result, { xss: undefined, imgs: 0 });
  assert.equal(dialogs, 0);
  // The page runs under a policy with no inline script or handler.
  const resp = await fetch(`http://127.0.0.1:${node.port}/_thali/`);
  const csp = resp.headers.get('content-security-policy');
  assert.doesNotMatch(csp, /script-src[^;]*unsafe-inline/);
  assert.match(csp, /script-src 'sha256-/);
});

test('log out ends the session', async () => {
  await page.click('#logout');
  await page.waitForSelector('#login-form', { state: 'visible' });
  await page.reload();
  await page.waitForSelector('#login-form', { state: 'visible' });
});
