// Node's built-in http2 client against the appliance's https listener (ALPN h2).
// Usage: node h2_client.js '<json>' with {proxy, ca, mode, ...}; prints one JSON result line.
// Modes: "get" (plain request on a stream), "connect-tls" (CONNECT stream carrying TLS to an
// origin), "websocket" (RFC 8441 extended CONNECT exchanging WebSocket frames), "parallel".
'use strict';
const http2 = require('http2');
const tls = require('tls');
const fs = require('fs');
const crypto = require('crypto');

const opts = JSON.parse(process.argv[2]);
const ca = fs.readFileSync(opts.ca);
const deadline = setTimeout(() => { finish({ error: 'timeout' }); }, (opts.timeout || 20) * 1000);

let finished = false;
function finish(result) {
  if (finished) return;            // the first outcome counts; late errors from closing do not
  finished = true;
  clearTimeout(deadline);
  // exit only once the line is out: writes to a pipe are asynchronous in Node
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.error ? 1 : 0));
}

function connect() {
  const session = http2.connect(opts.proxy, { ca, servername: opts.servername || 'localhost' });
  session.on('error', (e) => finish({ error: 'session: ' + e.message }));
  return session;
}

function collect(stream, cb) {
  const chunks = [];
  stream.on('data', (c) => chunks.push(c));
  stream.on('end', () => cb(Buffer.concat(chunks)));
}

function get(session, path, body) {
  return new Promise((resolve, reject) => {
    const headers = { ':method': body ? 'POST' : 'GET', ':scheme': 'http', ':authority': opts.origin, ':path': path,
                      ...(opts.headers || {}) };
    const req = session.request(headers, { endStream: !body });
    let response = null;
    let trailers = null;
    req.on('response', (h) => { response = h; });
    req.on('trailers', (t) => { trailers = t; });
    req.on('error', reject);
    collect(req, (data) => resolve({ status: response[':status'], headers: response, body: data, trailers }));
    if (body) req.end(body);
  });
}

// RFC 6455 client frames: masked, FIN set; the reader takes unmasked server frames.
function wsFrame(opcode, payload) {
  const mask = crypto.randomBytes(4);
  let head;
  if (payload.length < 126) head = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
  else if (payload.length < 65536) { head = Buffer.alloc(4); head[0] = 0x80 | opcode; head[1] = 0x80 | 126; head.writeUInt16BE(payload.length, 2); }
  else { head = Buffer.alloc(10); head[0] = 0x80 | opcode; head[1] = 0x80 | 127; head.writeBigUInt64BE(BigInt(payload.length), 2); }
  const masked = Buffer.alloc(payload.length);
  for (let i = 0; i < payload.length; i++) masked[i] = payload[i] ^ mask[i % 4];
  return Buffer.concat([head, mask, masked]);
}

function wsReader(onMessage) {
  let buf = Buffer.alloc(0);
  return (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f, off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
      if (buf.length < off + len) return;
      onMessage(buf[0] & 0x0f, buf.subarray(off, off + len));
      buf = buf.subarray(off + len);
    }
  };
}

const modes = {
  async get() {
    const session = connect();
    const r = await get(session, opts.path || '/echo');
    session.close();
    finish({ status: r.status, via: r.headers.via, body: r.body.toString(), alpn: session.alpnProtocol,
             trailers: r.trailers, headers: r.headers });
  },
  async parallel() {
    const session = connect();
    const n = opts.count || 100;
    const results = await Promise.all(Array.from({ length: n }, (_, i) => get(session, `/bytes?n=${opts.size || 100000}&i=${i}`)));
    session.close();
    finish({ statuses: results.map((r) => r.status), sizes: results.map((r) => r.body.length) });
  },
  async post() {
    const session = connect();
    const body = Buffer.alloc(opts.size || 1000000, 7);
    const r = await get(session, '/echo', body);
    session.close();
    finish({ status: r.status, echo: JSON.parse(r.body.toString()) });
  },
  'connect-tls'() {
    const session = connect();
    const stream = session.request({ ':method': 'CONNECT', ':authority': opts.origin });
    stream.on('response', (h) => {
      if (h[':status'] !== 200) return finish({ status: h[':status'] });
      const inner = tls.connect({ socket: stream, ca: fs.readFileSync(opts.origin_ca), servername: 'localhost', ALPNProtocols: ['http/1.1'] }, () => {
        inner.write(`GET /echo?inside=tls HTTP/1.1\r\nHost: ${opts.origin}\r\nConnection: close\r\n\r\n`);
      });
      inner.on('error', (e) => finish({ error: 'inner tls: ' + e.message }));
      collect(inner, (data) => { session.close(); finish({ status: 200, authorized: inner.authorized, reply: data.toString() }); });
    });
    stream.on('error', (e) => finish({ error: 'stream: ' + e.message }));
  },
  websocket() {
    const session = connect();
    session.on('remoteSettings', (settings) => {
      if (!settings.enableConnectProtocol) return finish({ error: 'no enableConnectProtocol', settings });
      const stream = session.request({ ':method': 'CONNECT', ':protocol': 'websocket', ':scheme': opts.scheme || 'http',
        ':path': opts.path || '/chat', ':authority': opts.origin, 'sec-websocket-version': '13' });
      // a message is a string, or {char, count} for a long one (argv has a size limit)
      const messages = (opts.messages || ['hello', { char: 'x', count: 100000 }])
        .map((m) => (typeof m === 'string' ? m : m.char.repeat(m.count)));
      const got = [];
      stream.on('response', (h) => {
        if (h[':status'] !== 200) { session.close(); return finish({ status: h[':status'] }); }
        stream.on('data', wsReader((opcode, payload) => {
          if (opcode === 1) got.push(payload.toString());
          if (got.length < messages.length) stream.write(wsFrame(1, Buffer.from(messages[got.length])));
          else { stream.end(wsFrame(8, Buffer.from([0x03, 0xe8]))); session.close();
                 finish({ status: 200, enableConnectProtocol: settings.enableConnectProtocol, messages: got }); }
        }));
        stream.write(wsFrame(1, Buffer.from(messages[0])));
      });
      stream.on('error', (e) => finish({ error: 'stream: ' + e.message }));
    });
  },
};

Promise.resolve().then(() => modes[opts.mode]()).catch((e) => finish({ error: String(e && e.stack || e) }));
