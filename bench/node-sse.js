// A plain Node SSE server, written the way teams write one by hand: a Map of topic -> Set of open
// responses, a POST endpoint that writes the body to every subscriber of a topic, a keep-alive
// comment every 15 s. No diffing, no replay, no backpressure handling. The comparison point for
// herald in bench/run.sh.
//
//   node bench/node-sse.js [port]      GET /sub/:topic (SSE)   POST /pub/:topic (body = data)
'use strict';
const http = require('http');

const port = Number(process.argv[2] || 8082);
const topics = new Map(); // topic -> Set<ServerResponse>

const server = http.createServer((req, res) => {
  const [, kind, topic] = req.url.split('/');
  if (req.method === 'GET' && kind === 'sub' && topic !== undefined) {
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
    });
    res.write('retry: 10000\n\n');
    let set = topics.get(topic);
    if (!set) topics.set(topic, (set = new Set()));
    set.add(res);
    req.on('close', () => {
      set.delete(res);
      if (set.size === 0) topics.delete(topic);
    });
    return;
  }
  if (req.method === 'POST' && kind === 'pub' && topic !== undefined) {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const msg = 'data: ' + Buffer.concat(chunks).toString().replace(/\n/g, '\ndata: ') + '\n\n';
      const set = topics.get(topic);
      if (set) for (const r of set) r.write(msg);
      res.writeHead(202, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ subscribers: set ? set.size : 0 }));
    });
    return;
  }
  res.writeHead(404);
  res.end();
});

// Keep-alive comments so proxies do not cut idle streams.
setInterval(() => {
  for (const set of topics.values()) for (const r of set) r.write(': keep-alive\n\n');
}, 15000);

server.keepAliveTimeout = 0;
server.requestTimeout = 0;
server.headersTimeout = 60000;
server.maxConnections = 100000;
server.listen(port, '127.0.0.1', () => console.error(`node-sse on http://127.0.0.1:${port}`));
