// TLS load for the bench: CONNECT downloads through a proxy's TLS port over HTTP/2 (n streams
// on one connection), and a stand-in "ceiling" server that answers CONNECT itself, over h2 and
// HTTP/1.1 in TLS, to show what the clients can take at all (HTTP/1.1's client is
// tls_h1_client.py).
//
//   node tls_client.js '<json>'   one JSON line on stdout, exit 0 (or 1 with {"error": ...})
//
// Modes (opts.mode):
//   "h2-connect"  one http2 session to opts.proxy (ALPN h2); opts.streams CONNECT streams to
//                 opts.target; on each, "GET n\n" to the bench's bulk server, then count n bytes
//   "ceiling"     serve: an h2 TLS server on opts.h2_port and an HTTP/1.1 TLS server on
//                 opts.h1_port, both answering CONNECT with 200 and then playing the bulk
//                 server themselves (read "GET n\n", send n bytes); prints {"ready": true}
//
// Every socket is on 127.0.0.1; every client run ends by opts.timeout seconds at the latest.
// The client's own CPU (process.cpuUsage, user+system) is reported, so that a run where the
// client, not the proxy, is the bottleneck shows as such.
'use strict';
const http2 = require('http2');
const tls = require('tls');
const fs = require('fs');

const opts = JSON.parse(process.argv[2]);
const MiB = 1024 * 1024;
const payload = Buffer.alloc(MiB, 'x');

let reported = false;
function finish(result) {
  if (reported) return;
  reported = true;
  // exit only once the line is out: writes to a pipe are asynchronous in Node
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.error ? 1 : 0));
}

function clientRun(openOne) {
  const deadline = setTimeout(() => finish({ error: 'timeout', ...progress() }), (opts.timeout || 60) * 1000);
  const n = opts.streams || 1;
  const perStream = Math.floor(opts.bytes / n);
  const got = new Array(n).fill(0);
  let cpu0 = null;
  let t0 = 0;
  let started = 0;
  let complete = 0;
  let done = 0;
  let seconds = 0;
  let cpu = null;
  const firstByte = [];
  function progress() {
    return { bytes: got.reduce((a, b) => a + b, 0), per_stream: got };
  }
  const api = {
    perStream,
    // every stream's 200 has arrived: start the clock, then ask each for its bytes
    ready(send) {
      started += 1;
      firstByte.push(send);
      if (started < n) return;
      cpu0 = process.cpuUsage();
      t0 = process.hrtime.bigint();
      for (const s of firstByte) s();
    },
    // true once stream i has all its bytes; the clock stops at the last byte of the last one
    data(i, k) {
      const before = got[i];
      got[i] += k;
      if (before < perStream && got[i] >= perStream && ++complete === n) {
        seconds = Number(process.hrtime.bigint() - t0) / 1e9;
        cpu = process.cpuUsage(cpu0);
      }
      return got[i] >= perStream;
    },
    ended(i) {
      done += 1;
      if (done < n) return;
      if (cpu === null) return api.fail(`streams ended early`);
      clearTimeout(deadline);
      const p = progress();
      const ok = got.every((g) => g === perStream);
      finish({ ...p, streams: n, bytes_wanted: perStream * n, seconds, ok,
               client_cpu_s: (cpu.user + cpu.system) / 1e6, ...(api.extra || {}),
               ...(ok ? {} : { error: `moved ${p.bytes} of ${perStream * n} bytes` }) });
    },
    fail(msg) { clearTimeout(deadline); finish({ error: msg, ...progress() }); },
    extra: null,
  };
  openOne(api, n);
}

function h2Connect(api, n) {
  // Chrome's choices: 6 MiB stream window, 15 MiB connection window, 16 KiB frames.
  const session = http2.connect(opts.proxy, {
    ca: fs.readFileSync(opts.ca), servername: opts.servername || 'localhost',
    settings: { initialWindowSize: opts.stream_window || 6 * MiB, enablePush: false,
                maxFrameSize: opts.max_frame_size || 16384 },
  });
  session.on('error', (e) => api.fail('session: ' + e.message));
  session.on('connect', () => {
    session.setLocalWindowSize(opts.connection_window || 15 * MiB);
    api.extra = { alpn: session.alpnProtocol };
  });
  let closed = 0;
  for (let i = 0; i < n; i++) {
    const stream = session.request({ ':method': 'CONNECT', ':authority': opts.target });
    stream.on('response', (h) => {
      if (h[':status'] !== 200) return api.fail(`CONNECT answered ${h[':status']}`);
      api.ready(() => stream.write(`GET ${api.perStream}\n`));
    });
    let finished = false;
    stream.on('data', (c) => {
      // all bytes here: END_STREAM; the proxy half-closes toward the bulk server, which closes
      if (api.data(i, c.length) && !finished) { finished = true; stream.end(); }
    });
    stream.on('error', (e) => api.fail(`stream ${i}: ${e.message}`));
    stream.on('close', () => {
      closed += 1;
      if (closed === n) session.close();
      api.ended(i);
    });
  }
}

// The ceiling server: the bulk protocol spoken right behind the CONNECT, no proxy, no origin.
function serveBulk(duplex) {
  let line = '';
  let sent = false;
  duplex.on('data', (c) => {
    if (sent) return;
    line += c.toString('latin1');
    const nl = line.indexOf('\n');
    if (nl < 0) return;
    sent = true;
    let remaining = Number(line.slice(4, nl));
    const pump = () => {
      while (remaining > 0) {
        const k = Math.min(remaining, MiB);
        remaining -= k;
        if (!duplex.write(k === MiB ? payload : payload.subarray(0, k))) return duplex.once('drain', pump);
      }
    };
    pump();
  });
  duplex.on('end', () => duplex.end());   // the client is done: close our side too
  duplex.on('error', () => {});
}

function ceiling() {
  const key = fs.readFileSync(opts.key);
  const cert = fs.readFileSync(opts.cert);
  const h2server = http2.createSecureServer({ key, cert, settings: { initialWindowSize: 6 * MiB } });
  h2server.on('stream', (stream, headers) => {
    if (headers[':method'] !== 'CONNECT') { stream.respond({ ':status': 405 }); return stream.end(); }
    stream.respond({ ':status': 200 });
    serveBulk(stream);
  });
  h2server.on('sessionError', () => {});
  const h1server = tls.createServer({ key, cert, ALPNProtocols: ['http/1.1'] }, (sock) => {
    sock.setNoDelay(true);
    let head = '';
    const onHead = (c) => {
      head += c.toString('latin1');
      if (head.indexOf('\r\n\r\n') < 0) return;
      sock.removeListener('data', onHead);
      sock.write('HTTP/1.1 200 Connection established\r\n\r\n');
      serveBulk(sock);
    };
    sock.on('data', onHead);
    sock.on('error', () => {});
  });
  h2server.listen(opts.h2_port, '127.0.0.1', () => {
    h1server.listen(opts.h1_port, '127.0.0.1', () => process.stdout.write('{"ready": true}\n'));
  });
  process.on('SIGTERM', () => process.exit(0));
}

try {
  if (opts.mode === 'h2-connect') clientRun(h2Connect);
  else if (opts.mode === 'ceiling') ceiling();
  else finish({ error: `unknown mode ${opts.mode}` });
} catch (e) {
  finish({ error: String(e && e.stack || e) });
}
