// A real Node.js http2 client through the proxy: GET and a POST, printed as JSON.
// usage: node node_h2_client.js https://localhost:PORT CA_FILE
const http2 = require("http2");
const fs = require("fs");
const [url, caFile] = process.argv.slice(2);
const session = http2.connect(url, { ca: fs.readFileSync(caFile) });
session.on("error", (e) => { console.error(e); process.exit(1); });
setTimeout(() => { console.error("timeout"); process.exit(1); }, 30000).unref();

function request(headers, body) {
  return new Promise((resolve, reject) => {
    const req = session.request(headers);
    let status = 0;
    const chunks = [];
    req.on("response", (h) => { status = h[":status"]; });
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve({ status, body: Buffer.concat(chunks).toString() }));
    req.on("error", reject);
    if (body) req.end(body); else req.end();
  });
}

(async () => {
  const get = await request({ ":path": "/node" });
  const post = await request({ ":method": "POST", ":path": "/sha256" }, Buffer.alloc(300000, "n"));
  const alpn = session.alpnProtocol;
  session.close();
  console.log(JSON.stringify({ alpn, get, post }));
})().catch((e) => { console.error(e); process.exit(1); });
