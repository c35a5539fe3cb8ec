// A second, independent HTTP/1.1 parser for the smuggling tests: Node's llhttp (the built-in
// `http` module, strict mode), nothing else. Bytes come base64-encoded on stdin; loopback only.
//
//   node http1_parse.js request            the bytes are what a client sent to a server:
//                                          prints {messages: [...], error}
//   node http1_parse.js response METHOD    the bytes are a server's answer to one METHOD request:
//                                          prints {messages: [...], error} (complete: true when
//                                          the body ended where its framing says)
//
// Each message: {method, target} or {status}, headers: [[name, value], ...] as received,
// body (latin1), trailers. Everything is bounded by a 5 s timer.
'use strict';
const http = require('http');
const net = require('net');

const mode = process.argv[2];
const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => run(Buffer.from(Buffer.concat(chunks).toString('ascii'), 'base64')));

function pairs(raw) {
  const out = [];
  for (let i = 0; i < raw.length; i += 2) out.push([raw[i], raw[i + 1]]);
  return out;
}

function finish(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(0);
}

function collect(message, extra, done) {
  const body = [];
  message.on('data', (c) => body.push(c));
  message.on('end', () => done(Object.assign(extra, {
    headers: pairs(message.rawHeaders), body: Buffer.concat(body).toString('latin1'),
    trailers: pairs(message.rawTrailers), complete: message.complete,
  })));
  message.on('aborted', () => done(Object.assign(extra, {
    headers: pairs(message.rawHeaders), body: Buffer.concat(body).toString('latin1'),
    trailers: [], complete: false,
  })));
}

function parseRequests(data) {
  const result = { messages: [], error: null };
  const server = http.createServer({ insecureHTTPParser: false });
  server.on('request', (req, res) => {
    collect(req, { method: req.method, target: req.url }, (m) => {
      result.messages.push(m);
      res.end();
    });
  });
  server.on('clientError', (err, socket) => {
    result.error = err.code || String(err);
    socket.destroy();
  });
  server.listen(0, '127.0.0.1', () => {
    const client = net.connect(server.address().port, '127.0.0.1', () => client.end(data));
    client.resume();
    client.on('close', () => setImmediate(() => finish(result)));
    client.on('error', () => {});
  });
}

function parseResponse(data, method) {
  const result = { messages: [], error: null };
  const server = net.createServer((socket) => {
    socket.on('data', () => {});
    socket.end(data);
  });
  server.listen(0, '127.0.0.1', () => {
    const req = http.request({ host: '127.0.0.1', port: server.address().port, method, path: '/',
                               agent: false, insecureHTTPParser: false });
    req.on('response', (res) => collect(res, { status: res.statusCode }, (m) => {
      result.messages.push(m);
      setImmediate(() => finish(result));
    }));
    req.on('error', (err) => { result.error = err.code || String(err); setImmediate(() => finish(result)); });
    req.end();
  });
}

function run(data) {
  if (mode === 'request') parseRequests(data);
  else if (mode === 'response') parseResponse(data, process.argv[3] || 'GET');
  else finish({ messages: [], error: `unknown mode ${mode}` });
}

setTimeout(() => finish({ messages: [], error: 'TIMEOUT' }), 5000).unref();
