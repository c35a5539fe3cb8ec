// Evaluate a PAC file with an engine nobody here wrote: npm pac-resolver on QuickJS.
// Usage: node pac_eval.js '<json>' with {pac: path, urls: [...], hosts: {name: ip}};
// prints one JSON line {url: result}. dnsResolve answers only from `hosts` (the test's table),
// so evaluating never asks the machine's resolver.
'use strict';
const fs = require('fs');
const { createPacResolver } = require('pac-resolver');
const { getQuickJS } = require('@tootallnate/quickjs-emscripten');

const opts = JSON.parse(process.argv[2]);
const hosts = opts.hosts || {};

async function main() {
  const qjs = await getQuickJS();
  const findProxy = createPacResolver(qjs, fs.readFileSync(opts.pac, 'utf8'), {
    sandbox: {
      dnsResolve: (host) => (Object.prototype.hasOwnProperty.call(hosts, host) ? hosts[host] : null),
      myIpAddress: () => '192.0.2.2',
    },
  });
  const results = {};
  for (const url of opts.urls) results[url] = await findProxy(url);
  process.stdout.write(JSON.stringify(results) + '\n');
}

main().catch((e) => { process.stdout.write(JSON.stringify({ error: String(e && e.stack || e) }) + '\n'); process.exit(1); });
