// Starts the real thali binary for interop tests and gives PouchDB handles to it.
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const net = require('node:net');

const PASSWORD = 'interop-password';
const ROOT = path.resolve(__dirname, '..', '..');
const BIN = process.env.THALI_BIN || path.join(ROOT, 'target', 'debug', 'thali');

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

function tempDir(tag) {
  return fs.mkdtempSync(path.join(os.tmpdir(), `thali-interop-${tag}-`));
}

class ThaliNode {
  constructor(dataDir, port) {
    this.dataDir = dataDir;
    this.port = port;
    this.base = `http://admin:${PASSWORD}@127.0.0.1:${port}`;
  }

  static async start(tag) {
    if (!fs.existsSync(BIN)) {
      throw new Error(`thali binary not found at ${BIN}: run cargo build first or set THALI_BIN`);
    }
    const node = new ThaliNode(tempDir(tag), await freePort());
    await node.spawn();
    return node;
  }

  async spawn() {
    this.proc = spawn(BIN, ['serve', '--data', this.dataDir, '--http', `127.0.0.1:${this.port}`], {
      env: { ...process.env, THALI_ADMIN_PASSWORD: PASSWORD, THALI_LOG: 'warn' },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      try {
        const r = await fetch(`http://127.0.0.1:${this.port}/_up`);
        if (r.ok) return;
      } catch (_) { /* not up yet */ }
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('thali did not start');
  }

  url(db) {
    return `${this.base}/${db}`;
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill('SIGTERM');
    const res = await this.exited;
    if (res.code !== 0) throw new Error(`thali exited with ${JSON.stringify(res)}`);
  }

  async restart() {
    await this.stop();
    await this.spawn();
  }

  async destroy() {
    if (this.proc && this.proc.exitCode === null) this.proc.kill('SIGKILL');
    fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}

// The real pouchdb-server (npm), LevelDB on disk, as a remote CouchDB-protocol peer.
class PouchServer {
  static async start(tag) {
    const bin = path.join(__dirname, 'node_modules', 'pouchdb-server', 'bin', 'pouchdb-server');
    if (!fs.existsSync(bin)) throw new Error('pouchdb-server missing: run `npm ci` in tests/interop');
    const s = new PouchServer();
    s.dataDir = tempDir(tag);
    s.port = await freePort();
    s.base = `http://127.0.0.1:${s.port}`;
    s.proc = spawn(process.execPath, [bin, '-p', String(s.port), '-o', '127.0.0.1', '-n', '-d', s.dataDir,
      '-c', path.join(s.dataDir, 'config.json')], { cwd: s.dataDir, stdio: ['ignore', 'ignore', 'ignore'] });
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      try {
        const r = await fetch(`${s.base}/`);
        if (r.ok) return s;
      } catch (_) { /* not up yet */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error('pouchdb-server did not start');
  }

  url(db) {
    return `${this.base}/${db}`;
  }

  async destroy() {
    if (this.proc.exitCode === null) {
      const gone = new Promise((r) => this.proc.on('exit', r));
      this.proc.kill('SIGKILL');
      await gone;
    }
    fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}

// Polls `fn` (errors count as "not yet") until it is truthy or `ms` pass.
async function waitFor(what, fn, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await fn()) return;
    } catch (_) { /* keep waiting */ }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

module.exports = { ThaliNode, PouchServer, tempDir, freePort, waitFor, PASSWORD, BIN };
