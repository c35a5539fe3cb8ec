// Load and origin for bench/h2_bench.py: HTTP/2 CONNECT fairness, WebSocket echo round trips
// (RFC 8441 extended CONNECT, CONNECT tunnels over h2 and HTTP/1.1, direct), and a raw RFC 6455
// echo origin.
//
//   node h2_client.js '<json>'   one JSON line on stdout, exit 0 (or 1 with {"error": ...})
//
// Modes (opts.mode):
//   "fair"      one http2 session to opts.proxy (ALPN h2, trusting opts.ca); opts.streams CONNECT
//               streams to opts.target (the bulk server), each asking "GET <huge>\n"; after
//               opts.warmup s, every stream's byte count is taken over opts.seconds: aggregate
//               and per-stream MB/s. Then the session is destroyed (the bulk server's send fails
//               and its thread ends).
//   "ws"        opts.streams WebSocket echo loops for opts.seconds (after opts.warmup s), each
//               sending one opts.size-byte binary message and waiting for its echo; opts.via:
//                 "h2-8441"     one h2 session to opts.proxy, extended CONNECT (:protocol websocket)
//                 "h2-connect"  one h2 session to opts.proxy, plain CONNECT, then the HTTP/1.1
//                               Upgrade inside the tunnel
//                 "h1-connect"  one TCP connection per loop to opts.proxy_port, CONNECT, Upgrade
//                 "direct"      one TCP connection per loop straight to the origin, Upgrade
//   "ws-echo"   serve: a raw RFC 6455 echo origin on opts.port (HTTP/1.1 Upgrade, then every
//               message echoed unmasked); prints {"ready": true}
//
// Every socket is on 127.0.0.1; every client run ends by opts.timeout seconds at the latest.
'use strict';
const http2 = require('http2');
const net = require('net');
const fs = require('fs');
const crypto = require('crypto');

const opts = JSON.parse(process.argv[2]);
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

let reported = false;
function finish(result) {
  if (reported) return;
  reported = true;
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.error ? 1 : 0));
}
if (opts.mode !== 'ws-echo') {   // a client run is bounded; the origin serves until SIGTERM
  setTimeout(() => finish({ error: 'timeout' }), (opts.timeout || 60) * 1000).unref();
}

function h2session() {
  const session = http2.connect(opts.proxy, {
    ca: fs.readFileSync(opts.ca), servername: opts.servername || 'localhost',
    // Chrome's choices: 6 MiB stream window, 15 MiB connection window, 16 KiB frames
    settings: { initialWindowSize: 6 * 1024 * 1024, enablePush: false, maxFrameSize: 16384 },
  });
  session.on('error', (e) => finish({ error: 'session: ' + e.message }));
  session.on('connect', () => session.setLocalWindowSize(15 * 1024 * 1024));
  return session;
}

// Streams are opened once the proxy's SETTINGS are in: an extended CONNECT needs its
// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3) before Node lets it out.
function whenSettled(session, open) {
  session.once('remoteSettings', open);
}

// --- fairness: n CONNECT streams on one connection, bytes per stream over a window ---------

function fair() {
  const n = opts.streams;
  const session = h2session();
  const got = new Array(n).fill(0);
  let open = 0;
  whenSettled(session, () => { for (let i = 0; i < n; i++) openOne(i); });
  function openOne(i) {
    const stream = session.request({ ':method': 'CONNECT', ':authority': opts.target });
    stream.on('response', (h) => {
      if (h[':status'] !== 200) return finish({ error: `CONNECT answered ${h[':status']}` });
      stream.write(`GET ${1e12}\n`);
      if (++open === n) setTimeout(measure, opts.warmup * 1000);
    });
    stream.on('data', (c) => { got[i] += c.length; });
    stream.on('error', (e) => { if (!reported) finish({ error: `stream ${i}: ${e.message}` }); });
  }
  function measure() {
    const start = got.slice();
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    setTimeout(() => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const cpu = process.cpuUsage(cpu0);
      const per = got.map((g, i) => g - start[i]);
      const total = per.reduce((a, b) => a + b, 0);
      const alpn = session.alpnProtocol;
      session.destroy();
      finish({ ok: true, alpn, streams: n, seconds, bytes: total, per_stream_bytes: per,
               client_cpu_s: (cpu.user + cpu.system) / 1e6 });
    }, opts.seconds * 1000);
  }
}

// --- WebSocket echo loops ------------------------------------------------------------------

function maskedFrame(size) {
  // FIN + binary, MASK bit, payload length, a fixed masking key; the same bytes every time
  const payload = Buffer.alloc(size, 'p');
  const key = Buffer.from([0x12, 0x34, 0x56, 0x78]);
  let head;
  if (size < 126) head = Buffer.from([0x82, 0x80 | size]);
  else if (size < 65536) { head = Buffer.from([0x82, 0x80 | 126, 0, 0]); head.writeUInt16BE(size, 2); }
  else throw new Error('size too large');
  for (let i = 0; i < size; i++) payload[i] ^= key[i & 3];
  return Buffer.concat([head, key, payload]);
}

function upgradeRequest(authority) {
  const key = crypto.randomBytes(16).toString('base64');
  return `GET /echo HTTP/1.1\r\nHost: ${authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
         `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
}

// One echo loop over a duplex already carrying WebSocket frames (after `skipHead` response
// bytes, when the Upgrade was sent by us): sends, waits for the whole echo, counts.
function echoLoop(duplex, frame, echoLen, counter, skipHead) {
  let pending = 0;
  let head = skipHead ? '' : null;
  const send = () => { if (!counter.stopped) duplex.write(frame); };
  duplex.on('data', (c) => {
    if (head !== null) {           // our own Upgrade: wait for the 101 head
      head += c.toString('latin1');
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      if (!/^HTTP\/1\.1 101/.test(head)) return finish({ error: 'upgrade: ' + head.split('\r\n')[0] });
      const rest = Buffer.from(head.slice(end + 4), 'latin1');
      head = null;
      counter.ready();
      if (rest.length) pending += rest.length;
      return;
    }
    pending += c.length;
    while (pending >= echoLen) { pending -= echoLen; counter.count += 1; send(); }
  });
  duplex.on('error', (e) => { if (!counter.stopped) finish({ error: 'ws: ' + e.message }); });
  counter.starters.push(send);
  if (!skipHead) counter.ready();
}

function ws() {
  const n = opts.streams;
  const size = opts.size;
  const frame = maskedFrame(size);
  const echoLen = size + (size < 126 ? 2 : 4);   // unmasked server frame
  const counter = { count: 0, stopped: false, starters: [], opened: 0, ready() {
    if (++this.opened === n) { for (const s of this.starters) s(); setTimeout(measure, opts.warmup * 1000); }
  } };
  const origin = opts.origin;   // host:port of the echo origin
  let session = null;
  if (opts.via.startsWith('h2')) session = h2session();
  const sockets = [];
  if (session) whenSettled(session, () => { for (let i = 0; i < n; i++) openOne(i); });
  else for (let i = 0; i < n; i++) openOne(i);
  function openOne(i) {
    if (opts.via === 'h2-8441') {
      const stream = session.request({ ':method': 'CONNECT', ':protocol': 'websocket',
        ':scheme': 'http', ':path': '/echo', ':authority': origin, 'sec-websocket-version': '13' });
      stream.on('response', (h) => {
        if (h[':status'] !== 200) return finish({ error: `extended CONNECT answered ${h[':status']}` });
        echoLoop(stream, frame, echoLen, counter, false);
      });
      stream.on('error', (e) => { if (!counter.stopped) finish({ error: 'stream: ' + e.message }); });
    } else if (opts.via === 'h2-connect') {
      const stream = session.request({ ':method': 'CONNECT', ':authority': origin });
      stream.on('response', (h) => {
        if (h[':status'] !== 200) return finish({ error: `CONNECT answered ${h[':status']}` });
        stream.write(upgradeRequest(origin));
        echoLoop(stream, frame, echoLen, counter, true);
      });
      stream.on('error', (e) => { if (!counter.stopped) finish({ error: 'stream: ' + e.message }); });
    } else {
      const direct = opts.via === 'direct';
      const sock = net.connect(direct ? Number(origin.split(':')[1]) : opts.proxy_port, '127.0.0.1');
      sockets.push(sock);
      sock.setNoDelay(true);
      sock.on('connect', () => {
        if (direct) { sock.write(upgradeRequest(origin)); echoLoop(sock, frame, echoLen, counter, true); return; }
        sock.write(`CONNECT ${origin} HTTP/1.1\r\nHost: ${origin}\r\n\r\n`);
        let head = '';
        const onHead = (c) => {
          head += c.toString('latin1');
          const end = head.indexOf('\r\n\r\n');
          if (end < 0) return;
          sock.removeListener('data', onHead);
          if (!/^HTTP\/1\.[01] 200/.test(head)) return finish({ error: 'CONNECT: ' + head.split('\r\n')[0] });
          sock.write(upgradeRequest(origin));
          echoLoop(sock, frame, echoLen, counter, true);
        };
        sock.on('data', onHead);
      });
      sock.on('error', (e) => { if (!counter.stopped) finish({ error: 'socket: ' + e.message }); });
    }
  }
  function measure() {
    const c0 = counter.count;
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    setTimeout(() => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const cpu = process.cpuUsage(cpu0);
      const trips = counter.count - c0;
      counter.stopped = true;
      const alpn = session ? session.alpnProtocol : null;
      if (session) session.destroy();
      for (const s of sockets) s.destroy();
      finish({ ok: trips > 0, via: opts.via, streams: n, size, seconds, round_trips: trips,
               round_trips_per_s: trips / seconds, alpn, client_cpu_s: (cpu.user + cpu.system) / 1e6,
               ...(trips > 0 ? {} : { error: 'no round trip completed' }) });
    }, opts.seconds * 1000);
  }
}

// --- the echo origin -----------------------------------------------------------------------

function wsEcho() {
  const server = net.createServer((sock) => {
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let upgraded = false;
    sock.on('data', (c) => {
      buf = buf.length ? Buffer.concat([buf, c]) : c;
      if (!upgraded) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const head = buf.subarray(0, end).toString('latin1');
        const m = /\r\nsec-websocket-key:\s*(\S+)/i.exec(head);
        if (!m) { sock.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n'); return; }
        const accept = crypto.createHash('sha1').update(m[1] + WS_GUID).digest('base64');
        sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
                   `Sec-WebSocket-Accept: ${accept}\r\n\r\n`);
        upgraded = true;
        buf = buf.subarray(end + 4);
      }
      const out = [];
      for (;;) {                      // every whole frame: unmask, echo unmasked (same opcode)
        if (buf.length < 2) break;
        const masked = (buf[1] & 0x80) !== 0;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) { if (buf.length < 4) break; len = buf.readUInt16BE(2); off = 4; }
        else if (len === 127) { if (buf.length < 10) break; len = Number(buf.readBigUInt64BE(2)); off = 10; }
        const keyOff = off;
        if (masked) off += 4;
        if (buf.length < off + len) break;
        const payload = Buffer.from(buf.subarray(off, off + len));
        if (masked) for (let i = 0; i < len; i++) payload[i] ^= buf[keyOff + (i & 3)];
        const opcode = buf[0] & 0x0f;
        buf = buf.subarray(off + len);
        if (opcode === 0x8) { sock.end(); return; }
        const head = len < 126 ? Buffer.from([0x80 | opcode, len])
          : Buffer.from([0x80 | opcode, 126, len >> 8, len & 0xff]);
        out.push(head, payload);
      }
      if (out.length) sock.write(Buffer.concat(out));
    });
    sock.on('error', () => {});
  });
  server.listen(opts.port, '127.0.0.1', () => process.stdout.write('{"ready": true}\n'));
  process.on('SIGTERM', () => process.exit(0));
  // one bad connection must not take the origin down for the rest of the run
  process.on('uncaughtException', (e) => process.stderr.write(`ws-echo: ${e && e.stack || e}\n`));
}

try {
  if (opts.mode === 'fair') fair();
  else if (opts.mode === 'ws') ws();
  else if (opts.mode === 'ws-echo') wsEcho();
  else finish({ error: `unknown mode ${opts.mode}` });
} catch (e) {
  finish({ error: String(e && e.stack || e) });
}
